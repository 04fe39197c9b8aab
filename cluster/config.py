"""Deploy configuration: YAML file -> validated, frozen dataclasses.

    cfg = load_config("deploy/local.yaml")          # or parse_config(dict, "name")
    cfg.pools.prefill.workers, cfg.mode, cfg.active_pools()

Validation happens once, here. Every problem raises `ConfigError` naming the file, the field
path (`pools.prefill.workers`) and what was expected. Every field except `version` has a
default; the defaults are exactly `deploy/local.yaml`. The schema is documented field by field
in docs/API.md.

Pools and modes: `pools` may hold four pools, `encode`, `prefill`, `decode` and `colocated`;
`mode` picks which run. `disaggregated` runs encode + prefill + decode (prefill and decode need
>= 1 worker each); `colocated` runs encode + colocated (>= 1 worker; each worker does chunked
prefill and decode). The pools of the other mode are validated but ignored, so one file can
switch modes by changing one line (or an override). An encode pool with 0 workers means images
are encoded inside the prefill / colocated workers.
"""

from __future__ import annotations

import copy
import difflib
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import yaml

from engine.sparse.config import SparseConfigError, SparseMethod, SparsePrefillConfig
from engine.worker_api import Mode, Role
from kv_transfer.registry import known_backends, transport_info

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """Invalid deploy config. `source` is the file (or name), `path` the dotted field path."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        super().__init__(f"{source}: {path}: {reason}" if path else f"{source}: {reason}")
        self.source, self.path, self.reason = source, path, reason


# The names are the registry's (kv_transfer/registry.py), with what each transport needs; this enum
# only types the field (TransportBackend.SHM.value == "shm").
TransportBackend = enum.Enum("TransportBackend", [(n.upper(), n) for n in known_backends()], type=str)


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: DType = DType.FLOAT32
    max_model_len: int = 8192


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray; "auto" / "HOST:PORT": join
    num_cpus: int | None = 4  # local Ray only; None: let Ray detect


@dataclass(frozen=True)
class EngineSettings:
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 1024
    max_num_seqs: int = 64


@dataclass(frozen=True)
class PoolConfig:
    """One pool. num_cpus / num_gpus / resources are what one worker reserves in Ray, for
    all its tensor_parallel x pipeline_parallel ranks together."""

    role: Role
    workers: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sparse: SparsePrefillConfig = SparsePrefillConfig()  # the engine's own settings object and defaults

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

    max_request_bytes: int = 32 << 20  # an HTTP body / a gRPC message
    max_prompt_chars: int = 262_144  # characters of text one request sends (prompt, or all its messages)
    max_messages: int = 1024  # chat messages in one request
    max_images: int = 16  # images in one request
    max_image_bytes: int = 16 << 20  # one encoded image
    max_image_pixels: int = 4096 * 4096  # width x height of one image, checked before it is decoded
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # characters of one stop string
    max_id_chars: int = 128  # a request id or session id
    max_tokens: int | None = None  # ceiling on a request's max_tokens; None: model.max_model_len
    max_requests_per_client: int = 64  # in flight (queued or running) per client; server-wide: max_queued_requests


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
        roles = (Role.ENCODE, Role.PREFILL, Role.DECODE) if self.mode is Mode.DISAGGREGATED else (Role.ENCODE, Role.COLOCATED)
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


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> DeployConfig:
    """Read and validate a deploy YAML. `overrides` maps dotted paths to values applied on top
    of the file before validation, e.g. {"mode": "colocated", "pools.prefill.workers": 2}."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(source, "", f"cannot read file: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, "", f"{where}invalid YAML: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(source, "", f"invalid YAML: {err}") from None
    return parse_config({} if data is None else data, source, overrides)


def parse_config(data: Any, source: str = "<dict>", overrides: Mapping[str, Any] | None = None) -> DeployConfig:
    """Validate an already-parsed YAML document (a dict)."""
    if overrides:
        data = _apply_overrides(data, overrides, source)
    root = _Section(data, "", source)
    version = root.int("version", required=True, lo=1)
    if version != SCHEMA_VERSION:
        root.fail("version", f"unsupported schema version {version}; this Triptych reads version {SCHEMA_VERSION}")
    cfg = DeployConfig(
        version=version,
        model=_model(root.section("model")),
        ray=_ray(root.section("ray")),
        mode=root.enum("mode", Mode, Mode.DISAGGREGATED),
        engine=_engine(root.section("engine")),
        pools=_pools(root.section("pools")),
        transport=_transport(root.section("transport")),
        slo=_slo(root.section("slo")),
        server=_server(root.section("server")),
        role_switching=_role_switching(root.section("role_switching")),
        source=source,
    )
    root.done()
    _check_cross_fields(cfg, root)
    return cfg


def _model(s: _Section) -> ModelConfig:
    d = ModelConfig()
    out = ModelConfig(
        path=s.str("path", d.path, nullable=True),
        dtype=s.enum("dtype", DType, d.dtype),
        max_model_len=s.int("max_model_len", d.max_model_len, lo=1),
    )
    s.done()
    return out


def _ray(s: _Section) -> RayConfig:
    d = RayConfig()
    out = RayConfig(address=s.str("address", d.address, nullable=True), num_cpus=s.int("num_cpus", d.num_cpus, lo=1, nullable=True))
    s.done()
    return out


def _engine(s: _Section) -> EngineSettings:
    d = EngineSettings()
    out = EngineSettings(**{f.name: s.int(f.name, getattr(d, f.name), lo=1) for f in fields(EngineSettings)})
    s.done()
    return out


def _sparse(s: _Section) -> SparsePrefillConfig:
    """The engine's SparsePrefillConfig itself; its defaults are the deploy defaults, and a value
    it refuses (e.g. a block_size that is not a power of two) is a ConfigError naming the field."""
    d = SparsePrefillConfig()
    values = dict(
        method=s.enum("method", SparseMethod, d.method),
        gamma=s.float("gamma", d.gamma, lo=0.0, hi=1.0, lo_open=True),
        tau=s.float("tau", d.tau, lo=0.0, hi=1.0),
        min_budget=s.int("min_budget", d.min_budget, lo=0),
        block_size=s.int("block_size", d.block_size, lo=16),
        dense_below=s.int("dense_below", d.dense_below, lo=0),
        sink=s.int("sink", d.sink, lo=0),
        local=s.int("local", d.local, lo=1),
    )
    s.done()
    try:
        return SparsePrefillConfig(**values)
    except SparseConfigError as err:
        s.fail(err.field, err.reason)


def _pool(s: _Section, default: PoolConfig) -> PoolConfig:
    role = default.role
    if "sparse" in s.data and role not in (Role.PREFILL, Role.COLOCATED):
        s.fail("sparse", "sparse attention applies only to the prefill and colocated pools")
    out = PoolConfig(
        role=role,
        workers=s.int("workers", default.workers, lo=0),
        num_cpus=s.float("num_cpus", default.num_cpus, lo=0.0),
        num_gpus=s.float("num_gpus", default.num_gpus, lo=0.0),
        resources=s.resources("resources", default.resources),
        tensor_parallel=s.int("tensor_parallel", default.tensor_parallel, lo=1),
        pipeline_parallel=s.int("pipeline_parallel", default.pipeline_parallel, lo=1),
        sparse=_sparse(s.section("sparse")),
    )
    s.done()
    return out


def _pools(s: _Section) -> PoolsConfig:
    d = PoolsConfig()
    out = PoolsConfig(**{r.value: _pool(s.section(r.value), d.get(r)) for r in Role})
    s.done()
    return out


def _transport(s: _Section) -> TransportConfig:
    d = TransportConfig()
    out = TransportConfig(backend=s.enum("backend", TransportBackend, d.backend), streaming=s.bool("streaming", d.streaming))
    s.done()
    return out


def _slo(s: _Section) -> SloConfig:
    d = SloConfig()
    out = SloConfig(
        ttft_ms=s.float("ttft_ms", d.ttft_ms, lo=0.0, lo_open=True),
        tpot_ms=s.float("tpot_ms", d.tpot_ms, lo=0.0, lo_open=True),
        attainment=s.float("attainment", d.attainment, lo=0.0, hi=1.0, lo_open=True),
    )
    s.done()
    return out


def _server(s: _Section) -> ServerConfig:
    d = ServerConfig()
    out = ServerConfig(
        host=s.str("host", d.host),
        grpc_port=s.int("grpc_port", d.grpc_port, lo=0, hi=65535),
        http_port=s.int("http_port", d.http_port, lo=0, hi=65535, nullable=True),
        admin_host=s.str("admin_host", d.admin_host),
        admin_port=s.int("admin_port", d.admin_port, lo=0, hi=65535, nullable=True),
        max_queued_requests=s.int("max_queued_requests", d.max_queued_requests, lo=1),
        request_timeout_s=s.float("request_timeout_s", d.request_timeout_s, lo=0.0, lo_open=True),
        reprefill_on_decode_failure=s.bool("reprefill_on_decode_failure", d.reprefill_on_decode_failure),
        limits=_limits(s.section("limits")),
        auth=_auth(s.section("auth")),
        tls=_tls(s.section("tls")),
        sessions=_sessions(s.section("sessions")),
        connections=_connections(s.section("connections")),
    )
    s.done()
    return out


def _limits(s: _Section) -> LimitsConfig:
    d = LimitsConfig()
    out = LimitsConfig(**{f.name: s.int(f.name, getattr(d, f.name), lo=1, nullable=f.name == "max_tokens")
                          for f in fields(LimitsConfig)})
    s.done()
    return out


def _auth(s: _Section) -> AuthConfig:
    out = AuthConfig(**{f.name: s.str(f.name, None, nullable=True) for f in fields(AuthConfig)})
    s.done()
    return out


def _tls(s: _Section) -> TlsConfig:
    out = TlsConfig(**{f.name: s.str(f.name, None, nullable=True) for f in fields(TlsConfig)})
    if (out.cert_file is None) != (out.key_file is None):
        s.fail("cert_file" if out.cert_file is None else "key_file", "TLS needs both cert_file and key_file")
    if out.client_ca_file is not None and out.cert_file is None:
        s.fail("client_ca_file", "client certificates (mutual TLS) need TLS: set cert_file and key_file")
    s.done()
    return out


def _sessions(s: _Section) -> SessionsConfig:
    d = SessionsConfig()
    out = SessionsConfig(**{f.name: (s.float(f.name, d.ttl_s, lo=0.0, lo_open=True) if f.name == "ttl_s"
                                     else s.int(f.name, getattr(d, f.name), lo=1)) for f in fields(SessionsConfig)})
    s.done()
    return out


def _connections(s: _Section) -> ConnectionsConfig:
    d = ConnectionsConfig()
    out = ConnectionsConfig(**{
        f.name: (s.int(f.name, getattr(d, f.name), lo=1) if f.type == "int"
                 else s.float(f.name, getattr(d, f.name), lo=0.0, lo_open=True))
        for f in fields(ConnectionsConfig)})  # fmt: skip
    s.done()
    return out


def _role_switching(s: _Section) -> RoleSwitchingConfig:
    d = RoleSwitchingConfig()
    out = RoleSwitchingConfig(
        enabled=s.bool("enabled", d.enabled),
        interval_s=s.float("interval_s", d.interval_s, lo=0.0, lo_open=True),
        sustain=s.int("sustain", d.sustain, lo=1),
        cooldown_s=s.float("cooldown_s", d.cooldown_s, lo=0.0),
        window_s=s.float("window_s", d.window_s, lo=0.0, lo_open=True),
        min_samples=s.int("min_samples", d.min_samples, lo=1),
        queue_high=s.float("queue_high", d.queue_high, lo=0.0, lo_open=True),
        kv_high=s.float("kv_high", d.kv_high, lo=0.0, hi=1.0, lo_open=True),
        drain_timeout_s=s.float("drain_timeout_s", d.drain_timeout_s, lo=0.0, lo_open=True),
        encode_prefill=s.bool("encode_prefill", d.encode_prefill),
        encode_queue_high=s.float("encode_queue_high", d.encode_queue_high, lo=0.0, lo_open=True),
    )
    s.done()
    return out


def _check_cross_fields(cfg: DeployConfig, root: _Section) -> None:
    needed = (Role.PREFILL, Role.DECODE) if cfg.mode is Mode.DISAGGREGATED else (Role.COLOCATED,)
    for role in needed:
        if cfg.pools.get(role).workers < 1:
            root.fail(f"pools.{role.value}.workers", f"{cfg.mode.value} mode needs at least 1 {role.value} worker, got 0")
    if cfg.role_switching.enabled and cfg.mode is not Mode.DISAGGREGATED:
        root.fail("role_switching.enabled", "role switching moves workers between prefill and decode; "
                  "it needs mode: disaggregated")
    if cfg.role_switching.encode_prefill and (cfg.mode is not Mode.DISAGGREGATED or cfg.pools.encode.workers < 1):
        root.fail("role_switching.encode_prefill", "switching between encode and prefill needs mode: disaggregated "
                  "and an encode pool (pools.encode.workers >= 1)")
    srv = cfg.server
    if srv.admin_port is not None and not is_loopback(srv.admin_host) and not (
            srv.auth.admin_keys_file or srv.auth.admin_keys_env):  # fmt: skip
        root.fail("server.admin_host", f"the admin service moves workers between pools; binding it to "
                  f"{srv.admin_host!r} (not loopback) needs an admin key (server.auth.admin_keys_file or "
                  f"admin_keys_env)")
    if srv.admin_port is not None and srv.admin_port != 0 and srv.admin_port in (srv.grpc_port, srv.http_port):
        root.fail("server.admin_port", f"{srv.admin_port} is also a serving port; the admin service needs its own")
    _check_transport(cfg, root)


def _check_transport(cfg: DeployConfig, root: _Section) -> None:
    """The registry's flags of the chosen transport hold for the pools that use it."""
    info = transport_info(cfg.transport.backend.value)
    pools = cfg.transport_pools()
    if pools and info.same_node_only and cfg.may_span_nodes():
        root.fail("transport.backend", f"{info.name!r} works only within one node, but "
                  f"ray.address {cfg.ray.address!r} joins a Ray cluster whose nodes may each host a pool; "
                  f"use gloo (CPU) or nccl (GPUs) across nodes, or a local Ray (ray.address: null)")
    for pool in pools if info.needs_cuda else ():
        if pool.num_gpus <= 0:
            root.fail("transport.backend", f"{info.name!r} moves KV between GPUs, but pools.{pool.role.value}.num_gpus is 0")


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a port on this machine ("localhost", 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Field readers


class _Section:
    """One mapping of the document being validated; remembers which keys were read so that
    `done()` can reject the rest as unknown."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        self.path, self.source = path, source
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(source, path or "<top level>", f"expected a mapping, got {_kind(data)}")
        self.data: Mapping[str, Any] = data
        self._known: list[str] = []

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, reason: str) -> NoReturn:
        raise ConfigError(self.source, self._where(key), reason)

    def _get(self, key: str, required: bool = False) -> tuple[bool, Any]:
        self._known.append(key)
        if key not in self.data:
            if required:
                self.fail(key, "required field is missing")
            return False, None
        return True, self.data[key]

    def section(self, key: str) -> _Section:
        _, value = self._get(key)
        return _Section(value, self._where(key), self.source)

    def done(self) -> None:
        for key in self.data:
            if key not in self._known:
                close = difflib.get_close_matches(str(key), self._known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(str(key), f"unknown key{hint}; allowed keys: {', '.join(self._known)}")

    def int(self, key: str, default: Any = None, *, required: bool = False, lo: int | None = None,
            hi: int | None = None, nullable: bool = False) -> Any:  # fmt: skip
        present, v = self._get(key, required)
        if not present or (v is None and nullable):
            return default if not present else None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"expected an integer{' or null' if nullable else ''}, got {_kind(v)}")
        self._range(key, v, lo, hi, what="an integer")
        return v

    def float(self, key: str, default: float, *, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False) -> float:  # fmt: skip
        present, v = self._get(key)
        if not present:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(key, f"expected a number, got {_kind(v)}")
        self._range(key, v, lo, hi, lo_open, what="a number")
        return float(v)

    def _range(self, key: str, v: float, lo: float | None, hi: float | None, lo_open: bool = False,
               what: str = "a value") -> None:  # fmt: skip
        bounds = [f"> {lo}" if lo_open else f">= {lo}"] if lo is not None else []
        bounds += [f"<= {hi}"] if hi is not None else []
        if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
            self.fail(key, f"expected {what} {' and '.join(bounds)}, got {v}")

    def str(self, key: str, default: Any, *, nullable: bool = False) -> Any:
        present, v = self._get(key)
        if not present or (v is None and nullable):
            return default if not present else None
        if not isinstance(v, str) or not v:
            self.fail(key, f"expected a non-empty string{' or null' if nullable else ''}, got {_kind(v)}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        present, v = self._get(key)
        if present and not isinstance(v, bool):
            self.fail(key, f"expected true or false, got {_kind(v)}")
        return v if present else default

    def enum(self, key: str, cls: type[enum.Enum], default: Any) -> Any:
        present, v = self._get(key)
        if not present:
            return default
        allowed = [m.value for m in cls]
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(key, f"expected one of {' | '.join(allowed)}, got {v!r}{hint}")
        return cls(v)

    def resources(self, key: str, default: Mapping[str, float]) -> Mapping[str, float]:
        present, v = self._get(key)
        if not present:
            return default
        if v is None:
            v = {}
        if not isinstance(v, Mapping):
            self.fail(key, f"expected a mapping of Ray resource name to amount, got {_kind(v)}")
        out = {}
        for name, amount in v.items():
            if not isinstance(name, str) or not name:
                self.fail(key, f"resource names must be non-empty strings, got {name!r}")
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                self.fail(f"{key}.{name}", "reserved Ray resource; use num_cpus / num_gpus")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
                self.fail(f"{key}.{name}", f"expected a number >= 0, got {_kind(amount)}")
            out[name] = amount
        return MappingProxyType(out)


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"number {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    return type(v).__name__


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _apply_overrides(data: Any, overrides: Mapping[str, Any], source: str) -> dict:
    """Copy of `data` with each dotted path in `overrides` set (creating sections as needed)."""
    if not isinstance(data, Mapping):
        raise ConfigError(source, "<top level>", f"expected a mapping, got {_kind(data)}")
    out = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(source, dotted, f"override crosses non-mapping field {part!r}")
            node = child
        node[last] = value
    return out


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        skip = {"source", "role"}
        if isinstance(obj, PoolConfig) and obj.role not in (Role.PREFILL, Role.COLOCATED):
            skip.add("sparse")  # only prefill-side pools accept sparse settings
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj) if f.name not in skip}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


__all__ = [
    "AuthConfig", "ConfigError", "ConnectionsConfig", "DType", "DeployConfig", "EngineSettings", "LimitsConfig",
    "Mode", "ModelConfig", "PoolConfig", "PoolsConfig", "RayConfig", "Role", "SCHEMA_VERSION", "ServerConfig",
    "SessionsConfig", "SloConfig", "SparsePrefillConfig", "TlsConfig",
    "SparseMethod", "TransportBackend", "TransportConfig", "load_config", "parse_config",
]  # fmt: skip
