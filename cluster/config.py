"""Deploy configuration: YAML file -> validated, frozen dataclasses.

    cfg = load_config("deploy/local.yaml")          # or parse_config(dict, "name")
    cfg.pools.prefill.workers, cfg.mode, cfg.active_pools()

Validation happens once, here. Every problem raises `ConfigError` naming the file, the field
path (`pools.prefill.workers`) and what was expected; a file that loads is valid as a whole
(cross-field rules: the mode's pools have workers, the transport suits the pools, the admin
port is guarded). The schema itself (the dataclasses, their defaults, pools and modes) is
cluster/config_schema.py; the typed field reader is cluster/config_reader.py. This module is
the one to import: it re-exports the schema.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from cluster.config_reader import ConfigError, Section, StrictLoader, apply_overrides
from cluster.config_schema import (
    SCHEMA_VERSION,
    AuthConfig,
    ConnectionsConfig,
    DeployConfig,
    DType,
    EngineSettings,
    LimitsConfig,
    ModelConfig,
    PoolConfig,
    PoolsConfig,
    RayConfig,
    RoleSwitchingConfig,
    ServerConfig,
    SessionsConfig,
    SloConfig,
    TlsConfig,
    TransportBackend,
    TransportConfig,
)
from engine.device import DEVICE_CHOICES, check_device, wants_gpu
from engine.errors import SettingError
from engine.kv_select.config import KVSelectionConfig, KVSelectionMethod
from engine.sparse.config import SparseMethod, SparsePrefillConfig
from engine.tensor_parallel import MAX_TENSOR_PARALLEL, TP_ROLES
from engine.worker_api import Mode, Role
from kv_transfer.registry import known_backends, transport_info

T = TypeVar("T")


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> DeployConfig:
    """Read and validate a deploy YAML. `overrides` maps dotted paths to values applied on top
    of the file before validation, e.g. {"mode": "colocated", "pools.prefill.workers": 2}."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(source, "", f"cannot read file: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
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
        data = apply_overrides(data, overrides, source)
    root = Section(data, "", source)
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


def _model(s: Section) -> ModelConfig:
    d = ModelConfig()
    out = ModelConfig(
        path=s.str("path", d.path, nullable=True),
        dtype=s.enum("dtype", DType, d.dtype),
        max_model_len=s.int("max_model_len", d.max_model_len, lo=1),
    )
    s.done()
    return out


def _ray(s: Section) -> RayConfig:
    d = RayConfig()
    out = RayConfig(
        address=s.str("address", d.address, nullable=True),
        num_cpus=s.int("num_cpus", d.num_cpus, lo=1, nullable=True),
        log_to_driver=s.bool("log_to_driver", d.log_to_driver),
    )
    s.done()
    return out


def _engine(s: Section) -> EngineSettings:
    d = EngineSettings()
    out = EngineSettings(
        **{
            f.name: s.bool(f.name, d.prefix_caching)
            if f.name == "prefix_caching"
            else s.int(f.name, getattr(d, f.name), lo=1)
            for f in fields(EngineSettings)
        }
    )
    s.done()
    return out


def _sparse(s: Section) -> SparsePrefillConfig:
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
    return _engine_settings(s, SparsePrefillConfig, values)


def _kv_selection(s: Section) -> KVSelectionConfig:
    """The engine's KVSelectionConfig itself, defaults from there; a value it refuses is a
    ConfigError naming the field."""
    d = KVSelectionConfig()
    values = dict(
        method=s.enum("method", KVSelectionMethod, d.method),
        budget=s.float("budget", d.budget, lo=0.0, hi=1.0, lo_open=True),
        min_budget=s.float("min_budget", d.min_budget, lo=0.0, hi=1.0),
        gamma=s.float("gamma", d.gamma, lo=0.0, hi=1.0, lo_open=True),
        sink=s.int("sink", d.sink, lo=0),
        window=s.int("window", d.window, lo=1),
        rescore_every=s.int("rescore_every", d.rescore_every, lo=1, hi=256),
        dense_below=s.int("dense_below", d.dense_below, lo=0),
    )
    return _engine_settings(s, KVSelectionConfig, values)


def _engine_settings(s: Section, cls, values: dict):
    """The engine's settings object `cls` built from a section's values; a value the engine
    refuses (its SettingError) is a ConfigError naming the field."""
    s.done()
    try:
        return cls(**values)
    except SettingError as err:
        s.fail(err.field, err.reason)


def _pool(s: Section, default: PoolConfig) -> PoolConfig:
    role = default.role
    if "sparse" in s.data and role not in (Role.PREFILL, Role.COLOCATED, Role.DECODE):
        s.fail("sparse", "sparse prefill applies only to the prefill, colocated and decode pools")
    if "kv_selection" in s.data and role not in (Role.DECODE, Role.COLOCATED):
        s.fail("kv_selection", "KV selection applies only to the decode and colocated pools")
    workers = s.int("workers", default.workers, lo=0)
    num_cpus = s.float("num_cpus", default.num_cpus, lo=0.0)
    num_gpus = s.float("num_gpus", default.num_gpus, lo=0.0)
    tp = s.int("tensor_parallel", default.tensor_parallel, lo=1, hi=MAX_TENSOR_PARALLEL)
    if tp > 1 and role not in TP_ROLES:
        s.fail(
            "tensor_parallel",
            f"{tp}: the {role.value} pool has no language model to split; tensor parallelism runs in the "
            f"{', '.join(sorted(r.value for r in TP_ROLES))} pools; use tensor_parallel 1 here",
        )
    out = PoolConfig(
        role=role,
        workers=workers,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        device=_device(s, default.device, num_gpus / tp),
        resources=s.resources("resources", default.resources),
        tensor_parallel=tp,
        pipeline_parallel=_pipeline_parallel(s, default.pipeline_parallel),
        sparse=_sparse(s.section("sparse")),
        kv_selection=_kv_selection(s.section("kv_selection")),
    )
    if out.kv_selection.on and tp > 1:
        s.fail(
            "kv_selection",
            f"{out.kv_selection.method.value} runs on one rank only; this pool has tensor_parallel {tp}",
        )
    s.done()
    return out


def _pipeline_parallel(s: Section, default: int) -> int:
    pp = s.int("pipeline_parallel", default, lo=1)
    if pp != 1:
        s.fail("pipeline_parallel", f"{pp}: pipeline parallelism is not built (a worker runs every layer); use 1")
    return pp


def _device(s: Section, default: str, num_gpus: float) -> str:
    """The pool's engine device (the engine's own check, engine/device.py). A CUDA device needs
    the pool to reserve GPUs: Ray hides every GPU from a worker that reserves none, and a worker
    (each rank of a tensor-parallel one) sees only as many as it reserves (device N is the N-th
    of its own); num_gpus here is one rank's share."""
    device = s.str("device", default)
    try:
        check_device(device, "device")
    except ValueError:
        s.fail("device", f"expected {DEVICE_CHOICES}, got {device!r}")
    if wants_gpu(device):
        visible = math.ceil(num_gpus)
        index = int(device.partition(":")[2] or 0)
        if visible == 0:
            s.fail("device", f"{device!r} needs num_gpus > 0: Ray shows a worker no GPU unless it reserves one")
        if index >= visible:
            s.fail("device", f"{device!r} is not among the {visible} GPU(s) a worker with num_gpus {num_gpus:g} sees")
    return device


def _pools(s: Section) -> PoolsConfig:
    d = PoolsConfig()
    out = PoolsConfig(**{r.value: _pool(s.section(r.value), d.get(r)) for r in Role})
    s.done()
    return out


def _transport(s: Section) -> TransportConfig:
    d = TransportConfig()
    out = TransportConfig(
        backend=s.enum("backend", TransportBackend, d.backend), streaming=s.bool("streaming", d.streaming)
    )
    s.done()
    return out


def _slo(s: Section) -> SloConfig:
    d = SloConfig()
    out = SloConfig(
        ttft_ms=s.float("ttft_ms", d.ttft_ms, lo=0.0, lo_open=True),
        tpot_ms=s.float("tpot_ms", d.tpot_ms, lo=0.0, lo_open=True),
        attainment=s.float("attainment", d.attainment, lo=0.0, hi=1.0, lo_open=True),
    )
    s.done()
    return out


def _server(s: Section) -> ServerConfig:
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
        cache_aware_routing=s.bool("cache_aware_routing", d.cache_aware_routing),
        access_log=s.bool("access_log", d.access_log),
        max_local_prefill_tokens=s.int("max_local_prefill_tokens", d.max_local_prefill_tokens, lo=0),
        limits=_limits(s.section("limits")),
        auth=_auth(s.section("auth")),
        tls=_tls(s.section("tls")),
        sessions=_positive_numbers(s.section("sessions"), SessionsConfig),
        connections=_positive_numbers(s.section("connections"), ConnectionsConfig),
    )
    s.done()
    return out


def _limits(s: Section) -> LimitsConfig:
    d = LimitsConfig()
    out = LimitsConfig(
        **{
            f.name: s.int(f.name, getattr(d, f.name), lo=1, nullable=f.name == "max_tokens")
            for f in fields(LimitsConfig)
        }
    )
    s.done()
    return out


def _auth(s: Section) -> AuthConfig:
    out = AuthConfig(**{f.name: s.str(f.name, None, nullable=True) for f in fields(AuthConfig)})
    s.done()
    return out


def _tls(s: Section) -> TlsConfig:
    out = TlsConfig(**{f.name: s.str(f.name, None, nullable=True) for f in fields(TlsConfig)})
    if (out.cert_file is None) != (out.key_file is None):
        s.fail("cert_file" if out.cert_file is None else "key_file", "TLS needs both cert_file and key_file")
    if out.client_ca_file is not None and out.cert_file is None:
        s.fail("client_ca_file", "client certificates (mutual TLS) need TLS: set cert_file and key_file")
    s.done()
    return out


def _positive_numbers(s: Section, cls: type[T]) -> T:
    """A section whose fields are all positive numbers (sessions, connections): ints >= 1, floats > 0."""
    d = cls()
    out = cls(
        **{
            f.name: (
                s.int(f.name, getattr(d, f.name), lo=1)
                if f.type == "int"
                else s.float(f.name, getattr(d, f.name), lo=0.0, lo_open=True)
            )
            for f in fields(cls)
        }
    )
    s.done()
    return out


def _role_switching(s: Section) -> RoleSwitchingConfig:
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


def _check_cross_fields(cfg: DeployConfig, root: Section) -> None:
    needed = (Role.PREFILL, Role.DECODE) if cfg.mode is Mode.DISAGGREGATED else (Role.COLOCATED,)
    for role in needed:
        if cfg.pools.get(role).workers < 1:
            root.fail(
                f"pools.{role.value}.workers", f"{cfg.mode.value} mode needs at least 1 {role.value} worker, got 0"
            )
    if cfg.role_switching.enabled and cfg.mode is not Mode.DISAGGREGATED:
        root.fail(
            "role_switching.enabled",
            "role switching moves workers between prefill and decode; it needs mode: disaggregated",
        )
    if cfg.role_switching.encode_prefill and (cfg.mode is not Mode.DISAGGREGATED or cfg.pools.encode.workers < 1):
        root.fail(
            "role_switching.encode_prefill",
            "switching between encode and prefill needs mode: disaggregated "
            "and an encode pool (pools.encode.workers >= 1)",
        )
    srv = cfg.server
    if (
        srv.admin_port is not None
        and not is_loopback(srv.admin_host)
        and not (srv.auth.admin_keys_file or srv.auth.admin_keys_env)
    ):
        root.fail(
            "server.admin_host",
            f"the admin service moves workers between pools; binding it to "
            f"{srv.admin_host!r} (not loopback) needs an admin key (server.auth.admin_keys_file or "
            f"admin_keys_env)",
        )
    if srv.admin_port is not None and srv.admin_port != 0 and srv.admin_port in (srv.grpc_port, srv.http_port):
        root.fail("server.admin_port", f"{srv.admin_port} is also a serving port; the admin service needs its own")
    _check_transport(cfg, root)


def _check_transport(cfg: DeployConfig, root: Section) -> None:
    """The registry's flags of the chosen transport hold for the pools that use it."""
    info = transport_info(cfg.transport.backend.value)
    pools = cfg.transport_pools()
    split = [
        p for p in (cfg.pools.prefill, cfg.pools.decode) if cfg.mode is Mode.DISAGGREGATED and p.tensor_parallel > 1
    ]
    for pool in split:
        if not info.tensor_parallel:
            root.fail(
                "transport.backend",
                f"{info.name!r} connects one sender to one cache, but pools.{pool.role.value}.tensor_parallel is "
                f"{pool.tensor_parallel}; KV between tensor-parallel workers moves over "
                f"{' or '.join(n for n in known_backends() if transport_info(n).tensor_parallel)}",
            )
        if cfg.role_switching.enabled:
            root.fail(
                "role_switching.enabled",
                f"pools.{pool.role.value}.tensor_parallel is {pool.tensor_parallel}: a tensor-parallel group keeps "
                "its role; switch roles with workers of tensor_parallel 1",
            )
    if pools and info.same_node_only and cfg.may_span_nodes():
        root.fail(
            "transport.backend",
            f"{info.name!r} works only within one node, but "
            f"ray.address {cfg.ray.address!r} joins a Ray cluster whose nodes may each host a pool; "
            f"use gloo (CPU) or nccl (GPUs) across nodes, or a local Ray (ray.address: null)",
        )
    for pool in pools if info.needs_cuda else ():
        if pool.num_gpus <= 0:
            root.fail(
                "transport.backend", f"{info.name!r} moves KV between GPUs, but pools.{pool.role.value}.num_gpus is 0"
            )
        if not wants_gpu(pool.engine_device()):
            root.fail(
                "transport.backend",
                f"{info.name!r} moves KV between GPUs, but pools.{pool.role.value}.device is {pool.device!r}",
            )


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a port on this machine ("localhost", 127.0.0.0/8, ::1)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = [
    "AuthConfig",
    "ConfigError",
    "ConnectionsConfig",
    "DType",
    "DeployConfig",
    "EngineSettings",
    "LimitsConfig",
    "Mode",
    "ModelConfig",
    "PoolConfig",
    "PoolsConfig",
    "RayConfig",
    "Role",
    "RoleSwitchingConfig",
    "SCHEMA_VERSION",
    "ServerConfig",
    "SessionsConfig",
    "SloConfig",
    "SparseMethod",
    "SparsePrefillConfig",
    "TlsConfig",
    "TransportBackend",
    "TransportConfig",
    "is_loopback",
    "load_config",
    "parse_config",
]
