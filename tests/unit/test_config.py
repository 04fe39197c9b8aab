"""cluster.config: defaults, every shipped example, and one test per kind of error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, DeployConfig, SparseMethod, TransportBackend, load_config, parse_config
from engine.worker_api import Mode, Role

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy").glob("*.yaml"))


def _error(data, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml", **kw)
    return info.value


def _with(**sections) -> dict:
    return {"version": 1, **sections}


def test_defaults_equal_local_yaml():
    local = load_config(REPO / "deploy" / "local.yaml")
    assert local == parse_config({"version": 1}) == DeployConfig()
    assert local.source.endswith("local.yaml")
    assert local.mode is Mode.DISAGGREGATED
    assert local.pools.prefill.resources == {"prefill": 1}
    assert local.pools.prefill.sparse.method is SparseMethod.DENSE
    # dtype auto: each engine takes its device's default (bfloat16 on CUDA, float32 on the CPU)
    from cluster.controller import engine_config

    assert local.model.engine_dtype is None and engine_config(local, local.pools.decode).dtype is None
    assert engine_config(local, local.pools.decode).placement().dtype == "float32"  # this CPU
    cached = parse_config(_with(engine={"prefix_caching": True}))
    # every pool with a language model caches prefixes (decode: a conversation's prompt + answer)
    assert all(engine_config(cached, p).prefix_caching for p in (cached.pools.prefill, cached.pools.decode))
    assert not any(engine_config(local, p).prefix_caching for p in (local.pools.prefill, local.pools.decode))
    assert parse_config(_with(model={"dtype": "bfloat16"})).model.engine_dtype == "bfloat16"
    assert [p.role for p in local.active_pools()] == [Role.PREFILL, Role.DECODE]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load_and_roundtrip(path):
    cfg = load_config(path)
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


def test_config_is_frozen():
    cfg = DeployConfig()
    with pytest.raises(AttributeError):
        cfg.mode = Mode.COLOCATED  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.pools.prefill.resources["x"] = 1  # type: ignore[index]


def test_full_pool_and_sparse_settings():
    cfg = parse_config(
        _with(
            pools={
                "prefill": {
                    "workers": 2,
                    "num_cpus": 2,
                    "num_gpus": 1,
                    "resources": {"prefill": 1, "fast": 0.5},
                    "tensor_parallel": 1,
                    "pipeline_parallel": 1,
                    "sparse": {
                        "method": "flexprefill",
                        "gamma": 0.95,
                        "tau": 0.2,
                        "min_budget": 512,
                        "block_size": 64,
                        "dense_below": 0,
                    },
                }
            }
        )
    )
    p = cfg.pools.prefill
    assert (p.workers, p.num_cpus, p.tensor_parallel) == (2, 2.0, 1)
    assert p.ray_resources() == {"CPU": 2.0, "GPU": 1.0, "prefill": 1, "fast": 0.5}
    assert p.sparse.method is SparseMethod.FLEXPREFILL and p.sparse.gamma == 0.95 and p.sparse.dense_below == 0


def test_parallelism_that_is_not_built_is_refused():
    cfg = parse_config(
        _with(mode="colocated", pools={"colocated": {"tensor_parallel": 3, "num_gpus": 3, "device": "cuda"}})
    )
    assert cfg.pools.colocated.tensor_parallel == 3  # each rank sees its one GPU as cuda:0
    cfg = parse_config(_with(transport={"backend": "shm"}, pools={"prefill": {"tensor_parallel": 3}}))
    assert (cfg.pools.prefill.tensor_parallel, cfg.pools.decode.tensor_parallel) == (3, 1)
    cfg = parse_config(_with(transport={"backend": "gloo"}, pools={"decode": {"tensor_parallel": 3}}))
    assert cfg.pools.decode.tensor_parallel == 3  # gloo sends each decode rank its heads
    err = _error(_with(transport={"backend": "fake"}, pools={"decode": {"tensor_parallel": 3}}))
    assert err.path == "transport.backend" and "pools.decode.tensor_parallel is 3" in err.reason
    assert "cuda_ipc or gloo or nccl or shm" in err.reason
    err = _error(
        _with(transport={"backend": "shm"}, role_switching={"enabled": True}, pools={"prefill": {"tensor_parallel": 3}})
    )
    assert err.path == "role_switching.enabled" and "keeps its role" in err.reason
    err = _error(_with(pools={"encode": {"workers": 1, "tensor_parallel": 2}}))
    assert err.path == "pools.encode.tensor_parallel" and "no language model" in err.reason
    err = _error(_with(mode="colocated", pools={"colocated": {"tensor_parallel": 10**12}}))
    assert err.path == "pools.colocated.tensor_parallel"
    err = _error(_with(pools={"colocated": {"pipeline_parallel": 2}}))
    assert err.path == "pools.colocated.pipeline_parallel" and "pipeline parallelism is not built" in err.reason
    err = _error(
        _with(mode="colocated", pools={"colocated": {"tensor_parallel": 2, "num_gpus": 2, "device": "cuda:1"}})
    )
    assert err.path == "pools.colocated.device" and "not among the 1 GPU(s)" in err.reason


def test_sparse_section_is_the_engines_config():
    from engine.sparse import SparseMethod as EngineSparseMethod
    from engine.sparse import SparsePrefillConfig

    assert SparseMethod is EngineSparseMethod  # one method enum
    for pool in (DeployConfig().pools.prefill, DeployConfig().pools.colocated):
        assert pool.sparse == SparsePrefillConfig()  # one set of defaults: the engine's
    cfg = parse_config(_with(pools={"prefill": {"sparse": {"method": "static", "local": 4}}}))
    assert cfg.pools.prefill.sparse == SparsePrefillConfig(method=SparseMethod.STATIC, local=4)
    err = _error(_with(pools={"prefill": {"sparse": {"block_size": 48}}}))  # the engine's own rule
    assert err.path == "pools.prefill.sparse.block_size" and "power of two" in err.reason


def test_kv_selection_section_is_the_engines_config_on_decode_side_pools():
    from cluster.controller import engine_config
    from engine.kv_select.config import KVSelectionConfig, KVSelectionMethod

    assert DeployConfig().pools.decode.kv_selection == KVSelectionConfig()  # one set of defaults
    assert engine_config(DeployConfig(), DeployConfig().pools.decode).kv_selection is None  # off: dense
    cfg = parse_config(_with(pools={"decode": {"kv_selection": {"method": "loopserve", "budget": 0.25}}}))
    chosen = KVSelectionConfig(method=KVSelectionMethod.LOOPSERVE, budget=0.25)
    assert cfg.pools.decode.kv_selection == chosen == engine_config(cfg, cfg.pools.decode).kv_selection
    assert parse_config(cfg.to_dict()) == cfg
    # a decode worker prefills a new turn over the history it holds: sparse prefill applies there too
    assert (
        parse_config(_with(pools={"decode": {"sparse": {"method": "flexprefill"}}})).pools.decode.sparse.method.value
        == "flexprefill"
    )
    err = _error(_with(pools={"prefill": {"kv_selection": {"method": "quest"}}}))
    assert err.path == "pools.prefill.kv_selection" and "decode and colocated pools" in err.reason
    err = _error(_with(pools={"decode": {"kv_selection": {"budget": 0.2, "min_budget": 0.3}}}))  # the engine's rule
    assert err.path == "pools.decode.kv_selection.min_budget" and "budget=0.2" in err.reason
    err = _error(_with(pools={"decode": {"kv_selection": {"method": "h2o"}}}))
    assert err.path == "pools.decode.kv_selection.method"
    err = _error(
        _with(
            transport={"backend": "shm"}, pools={"decode": {"tensor_parallel": 3, "kv_selection": {"method": "snapkv"}}}
        )
    )
    assert err.path == "pools.decode.kv_selection" and "one rank only" in err.reason


def test_colocated_mode_uses_colocated_pool():
    cfg = parse_config(_with(mode="colocated", pools={"prefill": {"workers": 0}, "colocated": {"workers": 2}}))
    assert [p.role for p in cfg.active_pools()] == [Role.COLOCATED]
    cfg = parse_config(_with(mode="colocated", pools={"encode": {"workers": 1}}))
    assert [p.role for p in cfg.active_pools()] == [Role.ENCODE, Role.COLOCATED]


def test_overrides():
    cfg = load_config(REPO / "deploy" / "local.yaml", overrides={"mode": "colocated", "pools.decode.workers": 3})
    assert cfg.mode is Mode.COLOCATED and cfg.pools.decode.workers == 3
    err = _error(_with(), overrides={"pools.prefill.workers": -2})
    assert err.path == "pools.prefill.workers"


def test_nullable_fields():
    cfg = parse_config(
        _with(ray={"address": "auto", "num_cpus": None}, server={"http_port": None}, transport={"backend": "gloo"})
    )
    assert cfg.ray.address == "auto" and cfg.ray.num_cpus is None and cfg.server.http_port is None


# -- errors -----------------------------------------------------------------------------------


def test_error_names_file_path_and_expectation():
    err = _error(_with(pools={"prefill": {"workers": -1}}))
    assert (err.source, err.path) == ("test.yaml", "pools.prefill.workers")
    assert str(err).startswith("test.yaml: pools.prefill.workers: expected an integer >= 0, got -1")


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        (_with(pools={"prefill": {"worker": 1}}), "pools.prefill.worker", "did you mean 'workers'?"),
        (_with(pools={"prefil": {}}), "pools.prefil", "did you mean 'prefill'?"),
        (_with(servr={}), "servr", "did you mean 'server'?"),
        (_with(engine={"zzz": 1}), "engine.zzz", "allowed keys: block_size"),
    ],
)
def test_unknown_keys(data, path, fragment):
    err = _error(data)
    assert err.path == path and fragment in str(err) and "unknown key" in str(err)


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        (
            _with(pools={"prefill": {"workers": "two"}}),
            "pools.prefill.workers",
            "expected an integer, got string 'two'",
        ),
        (_with(pools={"prefill": {"workers": 1.5}}), "pools.prefill.workers", "expected an integer"),
        (_with(engine={"block_size": True}), "engine.block_size", "got boolean true"),
        (_with(slo={"ttft_ms": "fast"}), "slo.ttft_ms", "expected a number"),
        (_with(transport={"streaming": "yes please"}), "transport.streaming", "expected true or false"),
        (_with(server={"host": 5}), "server.host", "expected a non-empty string"),
        (_with(pools=[1, 2]), "pools", "expected a mapping, got a list"),
        (_with(pools={"decode": {"resources": ["decode"]}}), "pools.decode.resources", "expected a mapping"),
        (_with(pools={"decode": {"resources": {"decode": "x"}}}), "pools.decode.resources.decode", "expected a number"),
        (_with(pools={"decode": {"resources": {"GPU": 1}}}), "pools.decode.resources.GPU", "use num_cpus / num_gpus"),
    ],
)
def test_wrong_types(data, path, fragment):
    err = _error(data)
    assert err.path == path and fragment in str(err)


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        (_with(pools={"decode": {"num_cpus": -1}}), "pools.decode.num_cpus", ">= 0"),
        (_with(pools={"decode": {"tensor_parallel": 0}}), "pools.decode.tensor_parallel", ">= 1"),
        (_with(engine={"num_kv_blocks": 0}), "engine.num_kv_blocks", ">= 1"),
        (_with(server={"grpc_port": 70000}), "server.grpc_port", "<= 65535"),
        (_with(slo={"tpot_ms": 0}), "slo.tpot_ms", "> 0"),
        (_with(pools={"prefill": {"sparse": {"gamma": 1.5}}}), "pools.prefill.sparse.gamma", "<= 1.0"),
    ],
)
def test_out_of_range(data, path, fragment):
    err = _error(data)
    assert err.path == path and fragment in str(err)


@pytest.mark.parametrize(
    ("data", "path", "fragment"),
    [
        (_with(mode="split"), "mode", "expected one of colocated | disaggregated, got 'split'"),
        (_with(transport={"backend": "shmem"}), "transport.backend", "did you mean 'shm'?"),
        (
            _with(pools={"prefill": {"sparse": {"method": "flex"}}}),
            "pools.prefill.sparse.method",
            "dense | flexprefill | static",
        ),
        (_with(model={"dtype": "fp16"}), "model.dtype", "auto | float32 | float16 | bfloat16"),
    ],
)
def test_bad_enum_values(data, path, fragment):
    err = _error(data)
    assert err.path == path and fragment in str(err)


def test_missing_required_version():
    err = _error({"mode": "colocated"})
    assert err.path == "version" and "required" in str(err)
    assert _error({"version": 2}).path == "version"


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_disaggregated_needs_prefill_and_decode_workers(role):
    err = _error(_with(pools={role: {"workers": 0}}))
    assert err.path == f"pools.{role}.workers" and f"disaggregated mode needs at least 1 {role} worker" in str(err)


def test_colocated_needs_colocated_workers():
    err = _error(_with(mode="colocated", pools={"colocated": {"workers": 0}}))
    assert err.path == "pools.colocated.workers"


def test_encode_pool_may_be_empty_but_takes_no_sparse():
    assert parse_config(_with(pools={"encode": {"workers": 0}})).pools.encode.workers == 0
    err = _error(_with(pools={"encode": {"sparse": {"method": "static"}}}))
    assert err.path == "pools.encode.sparse" and "prefill, colocated and decode pools" in err.reason


def test_transport_names_are_the_registrys():
    from kv_transfer.registry import known_backends

    assert sorted(b.value for b in TransportBackend) == sorted(known_backends())
    assert parse_config(_with(transport={"backend": "gloo"})).transport.backend is TransportBackend.GLOO


def test_gpu_transport_needs_gpus():
    err = _error(_with(transport={"backend": "nccl"}))
    assert err.path == "transport.backend" and "num_gpus is 0" in str(err)
    gpus = {"num_gpus": 1}
    cfg = parse_config(_with(transport={"backend": "nccl"}, pools={"prefill": gpus, "decode": gpus}))
    assert cfg.transport.backend is TransportBackend.NCCL
    # An encode pool sends image features through the transport too.
    err = _error(
        _with(transport={"backend": "cuda_ipc"}, pools={"prefill": gpus, "decode": gpus, "encode": {"workers": 1}})
    )
    assert err.path == "transport.backend" and "pools.encode.num_gpus is 0" in err.reason
    # Colocated mode moves nothing between workers: no GPU needed for the transport named.
    assert parse_config(_with(mode="colocated", transport={"backend": "nccl"})).mode is Mode.COLOCATED


@pytest.mark.parametrize("backend", ["shm", "cuda_ipc", "fake"])
def test_same_node_transport_refused_when_joining_a_cluster(backend):
    gpus = {"num_gpus": 1}
    data = _with(ray={"address": "auto"}, transport={"backend": backend}, pools={"prefill": gpus, "decode": gpus})
    err = _error(data)
    assert err.path == "transport.backend" and f"{backend!r}" in err.reason and "within one node" in err.reason
    assert (
        _error(
            _with(transport={"backend": backend}),
            overrides={"ray.address": "10.0.0.1:6379", "pools.prefill.num_gpus": 1, "pools.decode.num_gpus": 1},
        ).path
        == "transport.backend"
    )
    # A local Ray is one machine; colocated mode uses no transport; gloo and nccl cross nodes.
    parse_config(_with(transport={"backend": backend}, pools={"prefill": gpus, "decode": gpus}))
    parse_config(_with(mode="colocated", ray={"address": "auto"}, transport={"backend": backend}))
    for across in ("gloo", "nccl"):
        parse_config(
            _with(ray={"address": "auto"}, transport={"backend": across}, pools={"prefill": gpus, "decode": gpus})
        )


def test_invalid_yaml_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npools:\n  prefill:\n    workers: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "line " in str(info.value) and "invalid YAML" in str(info.value)


def test_duplicate_key_is_an_error(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("version: 1\nmode: colocated\nmode: disaggregated\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'mode'"):
        load_config(dup)


def test_missing_file_and_top_level_not_mapping(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


def test_role_switching_and_reprefill_settings():
    cfg = parse_config(
        {
            "version": 1,
            "server": {"reprefill_on_decode_failure": True},
            "role_switching": {"enabled": True, "cooldown_s": 10, "kv_high": 0.5, "sustain": 2},
        },
        "t",
    )
    rs = cfg.role_switching
    assert (
        cfg.server.reprefill_on_decode_failure
        and rs.enabled
        and (rs.cooldown_s, rs.kv_high, rs.sustain) == (10, 0.5, 2)
    )
    assert parse_config(cfg.to_dict(), "t") == cfg
    assert not DeployConfig().role_switching.enabled and not DeployConfig().server.reprefill_on_decode_failure
    err = _error({"version": 1, "mode": "colocated", "role_switching": {"enabled": True}})
    assert err.path == "role_switching.enabled" and "needs mode: disaggregated" in err.reason
    assert _error({"version": 1, "role_switching": {"kv_high": 1.5}}).path == "role_switching.kv_high"
    assert _error({"version": 1, "role_switching": {"sustain": 0}}).path == "role_switching.sustain"
    assert (
        _error({"version": 1, "role_switching": {"enabled": True, "cooldwn_s": 3}}).path == "role_switching.cooldwn_s"
    )


def test_encode_prefill_switching_needs_an_encode_pool():
    cfg = parse_config(
        {
            "version": 1,
            "pools": {"encode": {"workers": 2}},
            "role_switching": {"encode_prefill": True, "encode_queue_high": 3},
        },
        "t",
    )
    assert cfg.role_switching.encode_prefill and cfg.role_switching.encode_queue_high == 3
    assert parse_config(cfg.to_dict(), "t") == cfg
    assert not DeployConfig().role_switching.encode_prefill
    err = _error({"version": 1, "role_switching": {"encode_prefill": True}})  # encode pool of 0
    assert err.path == "role_switching.encode_prefill" and "pools.encode.workers >= 1" in err.reason
    err = _error(
        {
            "version": 1,
            "mode": "colocated",
            "pools": {"encode": {"workers": 1}},
            "role_switching": {"encode_prefill": True},
        }
    )
    assert err.path == "role_switching.encode_prefill" and "disaggregated" in err.reason
    assert _error({"version": 1, "role_switching": {"encode_queue_high": 0}}).path == "role_switching.encode_queue_high"


def test_server_security_settings():
    cfg = parse_config(
        {
            "version": 1,
            "server": {
                "auth": {"api_keys_file": "/k"},
                "tls": {"cert_file": "/c.pem", "key_file": "/c.key", "client_ca_file": "/ca.pem"},
                "limits": {"max_messages": 8},
                "sessions": {"max_session_bytes": 1000, "ttl_s": 5},
            },
        },
        "sec",
    )
    assert cfg.server.tls.enabled and cfg.server.limits.max_messages == 8 and cfg.server.sessions.ttl_s == 5.0
    with pytest.raises(ConfigError, match="server.admin_host: .*needs an admin key"):
        parse_config({"version": 1, "server": {"admin_host": "0.0.0.0"}}, "sec")
    parse_config({"version": 1, "server": {"admin_host": "0.0.0.0", "auth": {"admin_keys_env": "K"}}}, "sec")
    with pytest.raises(ConfigError, match="server.tls.key_file: TLS needs both cert_file and key_file"):
        parse_config({"version": 1, "server": {"tls": {"cert_file": "/c.pem"}}}, "sec")
    with pytest.raises(ConfigError, match="server.tls.client_ca_file: client certificates"):
        parse_config({"version": 1, "server": {"tls": {"client_ca_file": "/ca.pem"}}}, "sec")
    with pytest.raises(ConfigError, match="server.admin_port: 50051 is also a serving port"):
        parse_config({"version": 1, "server": {"admin_port": 50051}}, "sec")
    with pytest.raises(ConfigError, match="server.limits.max_tokn: unknown key .did you mean 'max_tokens'"):
        parse_config({"version": 1, "server": {"limits": {"max_tokn": 5}}}, "sec")
