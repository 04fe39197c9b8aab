"""The deploy schema: frozen dataclasses, one per section of a deploy YAML (docs/API.md documents
them field by field). cluster/config.py builds them from a file; nothing here reads YAML.

Invariants: every field except `version` has a default, and the defaults are exactly
`deploy/local.yaml`; objects are frozen (resources are read-only mappings), so a validated
config is never changed after load. Defaults owned by a lower layer are taken from it, not
copied: a pool's `sparse` is the engine's SparsePrefillConfig, transport names are the
registry's (kv_transfer/registry.py).

Pools and modes: `pools` may hold four pools, `encode`, `prefill`, `decode` and `colocated`;
`mode` picks which run. `disaggregated` runs encode + prefill + decode (prefill and decode need
>= 1 worker each); `colocated` runs encode + colocated (>= 1 worker; each worker does chunked
prefill and decode). The pools of the other mode are validated but ignored, so one file can
switch modes by changing one line (or an override). An encode pool with 0 workers means images
are encoded inside the prefill / colocated workers.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any

from engine.kv_select.config import KVSelectionConfig
from engine.sparse.config import SparsePrefillConfig
from engine.worker_api import Mode, Role
from kv_transfer.registry import known_backends

SCHEMA_VERSION = 1


# The names are the registry's (kv_transfer/registry.py), with what each transport needs; this enum
# only types the field (TransportBackend.SHM.value == "shm").
TransportBackend = enum.Enum("TransportBackend", [(n.upper(), n) for n in known_backends()], type=str)


class DType(str, enum.Enum):
    """The weights' and KV cache's dtype. AUTO: each engine takes its device's default
    (engine/device.py: bfloat16 on CUDA, float32 on the CPU)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: DType = DType.AUTO
    max_model_len: int = 8192

    @property
    def engine_dtype(self) -> str | None:
        """EngineConfig.dtype: None (the device's default) for auto."""
        return None if self.dtype is DType.AUTO else self.dtype.value


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" / "HOST:PORT": join
    num_cpus: int | None = 4  # local Ray only; None: let Ray detect
    log_to_driver: bool = False  # the workers' stdout/stderr in `triptych serve`'s output (else Ray's log files)


@dataclass(frozen=True)
class EngineSettings:
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64
    prefix_caching: bool = False  # EngineConfig.prefix_caching, for every colocated, prefill and decode worker


@dataclass(frozen=True)
class PoolConfig:
    """One pool. num_cpus / num_gpus / resources are what one worker reserves in Ray, for
    all its tensor_parallel x pipeline_parallel ranks together. device is where its engine runs
    (the engine's setting, engine/device.py: auto | cpu | cuda | cuda:N; `auto` as
    `engine_device` says)."""

    role: Role
    workers: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    device: str = "auto"
    resources: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sparse: SparsePrefillConfig = SparsePrefillConfig()  # the engine's own settings object and defaults
    kv_selection: KVSelectionConfig = KVSelectionConfig()  # decode-side KV selection (the engine's own object)

    def engine_device(self) -> str:
        """The engine's device setting for this pool's workers. `auto` is the GPU Ray assigns the
        worker: `cuda` when the pool reserves GPUs (a worker whose node has none then fails at
        start, naming the pool and the node, instead of running on the CPU), else `cpu`."""
        if self.device == "auto":
            return "cuda" if self.num_gpus > 0 else "cpu"
        return self.device

    def ray_resources(self) -> dict[str, float]:
        """The resources of one worker as a Ray resource dict (CPU, GPU, custom)."""
        out = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        return out


def _default_pool(role: Role, workers: int) -> PoolConfig:
    return PoolConfig(role=role, workers=workers, resources=MappingProxyType({role.value: 1}))


@dataclass(frozen=True)
class PoolsConfig:
    encode: PoolConfig = _default_pool(Role.ENCODE, 0)
    prefill: PoolConfig = _default_pool(Role.PREFILL, 1)
    decode: PoolConfig = _default_pool(Role.DECODE, 1)
    colocated: PoolConfig = _default_pool(Role.COLOCATED, 1)

    def get(self, role: Role | str) -> PoolConfig:
        return getattr(self, Role(role).value)


@dataclass(frozen=True)
class TransportConfig:
    backend: TransportBackend = TransportBackend.SHM
    streaming: bool = True  # layer-wise KV streaming during prefill


@dataclass(frozen=True)
class SloConfig:
    ttft_ms: float = 2000.0
    tpot_ms: float = 200.0
    attainment: float = 0.9  # fraction of requests that must meet both SLOs (goodput)


@dataclass(frozen=True)
class LimitsConfig:
    """Caps the gateway checks at the door, before any expensive work (docs/SECURITY.md). Each
    refusal names the setting."""

    # An HTTP body / a gRPC message. gRPC copies a message into one buffer on the event loop before
    # any of the gateway's code sees it (10-30 ms at 16 MiB here, 20-65 ms and more at 30 MiB):
    # this cap also bounds how long one request can hold up everyone's streams.
    max_request_bytes: int = 16 << 20
    max_prompt_chars: int = 262_144  # characters of text one request sends (prompt, or all its messages)
    max_messages: int = 1024  # chat messages in one request
    max_images: int = 16  # images in one request
    max_image_bytes: int = 8 << 20  # one encoded image
    max_image_pixels: int = 4096 * 4096  # width x height of one image, checked before it is decoded
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # characters of one stop string
    max_id_chars: int = 128  # a request id, session id or cache salt
    max_tokens: int | None = None  # ceiling on a request's max_tokens; None: model.max_model_len
    max_requests_per_client: int = 64  # in flight (queued or running) per client; server-wide: max_queued_requests
    max_choices: int = 8  # OpenAI `n`: choices of one request (each counts as a request in flight)


@dataclass(frozen=True)
class AuthConfig:
    """Where the API keys are; keys themselves never appear in the YAML (or in logs). A file has
    one key per line, `name:key` (the name identifies the client) or a bare `key`; an
    environment variable holds the same entries separated by commas. No serving keys: the
    serving ports take every client as one anonymous client."""

    api_keys_file: str | None = None
    api_keys_env: str | None = None
    admin_keys_file: str | None = None
    admin_keys_env: str | None = None


@dataclass(frozen=True)
class TlsConfig:
    """TLS on every port of the gateway (gRPC, HTTP, admin) from PEM files; client_ca_file also
    makes clients present a certificate signed by that CA (mutual TLS)."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class SessionsConfig:
    """Bounds of the multi-turn session store (cluster/sessions.py). Sizes count text characters
    plus image bytes. A client past its own bounds forgets its least recently used sessions; past
    the total bounds, the client holding the most loses its least recently used one."""

    max_sessions: int = 4096  # in total
    max_sessions_per_client: int = 256
    max_session_bytes: int = 1 << 20  # history kept per session; its oldest turns go first
    max_bytes_per_client: int = 64 << 20
    max_bytes: int = 512 << 20  # in total
    ttl_s: float = 3600.0  # idle sessions are forgotten


@dataclass(frozen=True)
class ConnectionsConfig:
    """Timeouts that keep idle and slow clients from holding connections."""

    http_read_timeout_s: float = 30.0  # reading one request's headers and body
    http_keepalive_s: float = 75.0  # an idle keep-alive HTTP connection is closed after this
    grpc_max_concurrent_streams: int = 256  # per connection
    grpc_max_connection_idle_s: float = 300.0
    grpc_max_connection_age_s: float = 3600.0  # then GOAWAY; running calls get request_timeout_s to end
    grpc_min_ping_interval_s: float = 10.0  # clients pinging more often are disconnected


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    grpc_port: int = 50051  # 0: pick a free port
    http_port: int | None = 8000  # None: no OpenAI-compatible HTTP server; 0: free port
    admin_host: str = "127.0.0.1"  # the admin service (role switching, cluster status) listens here only
    admin_port: int | None = 50052  # None: no admin service; 0: free port
    max_queued_requests: int = 256
    request_timeout_s: float = 300.0
    reprefill_on_decode_failure: bool = False  # a dead decode worker's requests go on elsewhere
    cache_aware_routing: bool = True  # with engine.prefix_caching: prompts go where their prefix is cached
    access_log: bool = False  # one INFO line per HTTP request (logger triptych.access)
    # With cache-aware routing, disaggregated: a request whose earlier turns a decode worker holds
    # and whose part not cached there is at most this many tokens is prefilled on that decode
    # worker, with no transfer (conditional disaggregation); 0: every prompt goes to a prefill worker.
    max_local_prefill_tokens: int = 256
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    tls: TlsConfig = TlsConfig()
    sessions: SessionsConfig = SessionsConfig()
    connections: ConnectionsConfig = ConnectionsConfig()


@dataclass(frozen=True)
class RoleSwitchingConfig:
    """The role policy (cluster/role_policy.py); SLOs come from `slo`. Disaggregated mode only."""

    enabled: bool = False
    interval_s: float = 2.0  # how often the signals are read
    sustain: int = 3  # consecutive checks a proposal must hold before a switch
    cooldown_s: float = 30.0  # no switch for this long after one
    window_s: float = 60.0  # requests that ended this recently count
    min_samples: int = 8  # requests needed before attainment counts
    queue_high: float = 2.0  # prefill queue per worker that counts as a prefill shortage
    kv_high: float = 0.8  # decode KV usage that counts as a decode shortage
    drain_timeout_s: float = 60.0  # a worker's requests must end within this before it switches
    # Vision-language models: encode and prefill workers load the vision tower AND the language
    # model, so either can switch to the other role (manually, or by the policy when enabled).
    encode_prefill: bool = False
    encode_queue_high: float = 2.0  # image shards in flight per encode worker that count as an encode shortage


@dataclass(frozen=True)
class DeployConfig:
    version: int = SCHEMA_VERSION
    model: ModelConfig = ModelConfig()
    ray: RayConfig = RayConfig()
    mode: Mode = Mode.DISAGGREGATED
    engine: EngineSettings = EngineSettings()
    pools: PoolsConfig = PoolsConfig()
    transport: TransportConfig = TransportConfig()
    slo: SloConfig = SloConfig()
    server: ServerConfig = ServerConfig()
    role_switching: RoleSwitchingConfig = RoleSwitchingConfig()
    source: str = field(default="<defaults>", compare=False)

    def active_pools(self) -> tuple[PoolConfig, ...]:
        """The pools this mode runs, with at least one worker, in request-path order."""
        roles = (
            (Role.ENCODE, Role.PREFILL, Role.DECODE)
            if self.mode is Mode.DISAGGREGATED
            else (Role.ENCODE, Role.COLOCATED)
        )
        return tuple(p for p in (self.pools.get(r) for r in roles) if p.workers > 0)

    def transport_pools(self) -> tuple[PoolConfig, ...]:
        """The active pools whose workers send or receive through `transport`: every one in
        disaggregated mode (image features encode -> prefill, KV prefill -> decode); none in
        colocated mode (a colocated worker keeps its own KV and encodes its own images)."""
        return self.active_pools() if self.mode is Mode.DISAGGREGATED else ()

    def may_span_nodes(self) -> bool:
        """Whether the workers may run on different machines: the deployment joins a Ray cluster
        (`ray.address`, which `triptych serve --address` sets too), where Ray places each worker
        on any node offering its pool's resources. A local Ray (address null) is this machine."""
        return self.ray.address is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict; `parse_config(cfg.to_dict())` gives back an equal config."""
        return _plain(self)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        skip = {"source", "role"}
        if isinstance(obj, PoolConfig) and obj.role not in (Role.PREFILL, Role.COLOCATED, Role.DECODE):
            skip.add("sparse")  # only pools that prefill accept sparse settings (a decode worker: a new turn)
        if isinstance(obj, PoolConfig) and obj.role not in (Role.DECODE, Role.COLOCATED):
            skip.add("kv_selection")  # only decode-side pools select KV
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if f.name not in skip}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
