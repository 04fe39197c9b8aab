"""The engine's device: settings checked once, resolved once (auto → the CPU here, a GPU refused
clearly without CUDA, naming the pool and the node), and every tensor of a running tiny engine on
the resolved device. The same checks on CUDA are tests/gpu/test_engine_gpu.py."""

from __future__ import annotations

import pytest
import torch

from cluster.config import ConfigError, parse_config
from cluster.controller import engine_config
from engine.config import EngineConfig
from engine.device import DeviceError, check_device, default_dtype, resolve_device
from engine.errors import EngineError
from engine.kv_layout import KVLayout
from engine.llm_engine import LLMEngine
from engine.model_runner import ModelRunner
from engine.sequence import SamplingParams
from engine.worker_api import Role
from tests.helpers.devices import off_device, record_steps, resident_tensors

CPU = torch.device("cpu")


@pytest.fixture
def no_cuda(monkeypatch):
    """This process sees no CUDA device (as on this machine; forced so the test holds on a GPU one)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch):
    """This process sees one CUDA device (resolution only: nothing is allocated on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


# ------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("value", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_settings_accepted(value):
    assert check_device(value) == value
    assert EngineConfig(device=value).device == value


@pytest.mark.parametrize("value", ["gpu", "CPU", "cuda:", "cuda:-1", "cuda:01", "cuda:x", "mps", "", None, 0])
def test_device_settings_refused(value):
    with pytest.raises(EngineError, match=r"EngineConfig.device must be auto, cpu, cuda or cuda:N"):
        EngineConfig(device=value)


def test_dtype_none_takes_the_device_default(no_cuda):
    assert EngineConfig().dtype is None and EngineConfig().device == "cpu"
    assert EngineConfig().placement().dtype == "float32"
    assert EngineConfig(dtype="bfloat16").placement().dtype == "bfloat16"
    assert default_dtype(torch.device("cuda", 0)) == "bfloat16" and default_dtype(CPU) == "float32"
    with pytest.raises(EngineError, match="EngineConfig.dtype"):
        EngineConfig(dtype="float64")


# ------------------------------------------------------------------------------------ resolution
def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == CPU == resolve_device("cpu")
    assert EngineConfig(device="auto").placement().device == CPU


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_names_the_pool_and_the_node(no_cuda, value):
    with pytest.raises(DeviceError) as info:
        EngineConfig(device=value, pool="decode").placement()
    msg = str(info.value)
    assert f"pool 'decode' asks for a GPU (device {value!r})" in msg
    assert "node local (host " in msg and "has none" in msg


def test_cuda_index_must_be_visible(one_gpu):
    assert resolve_device("auto") == torch.device("cuda", 0) == resolve_device("cuda") == resolve_device("cuda:0")
    assert EngineConfig(device="auto").placement().dtype == "bfloat16"
    with pytest.raises(DeviceError, match=r"pool 'prefill' asks for device 'cuda:1', but node local .* 1 CUDA device"):
        resolve_device("cuda:1", pool="prefill")


def test_cuda_without_triton_says_to_install_the_gpu_extra(one_gpu, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    with pytest.raises(DeviceError, match=r"pool 'decode' runs on CUDA.*no triton module.*'triptych\[gpu\]'"):
        resolve_device("auto", pool="decode")
    assert resolve_device("cpu") == CPU


# ------------------------------------------------------------------------------------ tensors
def test_tiny_engine_tensors_all_on_the_cpu(tiny, make_engine):
    """auto on this machine is the CPU: weights, buffers, KV cache, every step's inputs and
    attention metadata (chunked prefill with context, decode buckets), logits and seeded
    generators are all there, and the output is unchanged."""
    engine = make_engine(tiny, device="auto", block_size=8, num_kv_blocks=128, max_num_batched_tokens=24)
    assert engine.placement.device == CPU and not off_device(resident_tensors(engine), CPU)
    steps = record_steps(engine)
    prompts = [list(range(3, 3 + n)) for n in (5, 30, 9)]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    seeded = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, seed=3)
    engine.generate(prompts, [greedy, greedy, seeded])
    kinds = " ".join(steps)
    assert "context slots" in kinds and "decode 0 mask" in kinds and "logits" in kinds and "generator" in kinds
    assert not off_device(steps, CPU)


def test_a_cache_on_another_device_is_refused(tiny):
    """A transport's receive buffer elsewhere than the engine (here: meta, standing for a host
    buffer under a GPU engine) fails the engine's start, naming the pool."""
    layout = KVLayout.from_model_config(tiny.model.config, model_id="t", dtype=torch.float32, block_size=8)
    with pytest.raises(EngineError, match="the KV cache is on meta but the model's weights are on cpu"):
        ModelRunner(tiny.model, layout, layout.new_cache(4, "meta"))
    with pytest.raises(EngineError, match="pool 'decode': the KV cache given to the engine is on meta, but the engine"):
        LLMEngine(EngineConfig(pool="decode", block_size=8, num_kv_blocks=4), tiny, kv=layout.new_cache(4, "meta"))


# ------------------------------------------------------------------------------------ deploy
def _colocated(**fields):
    """The colocated pool of a config that sets `fields` on it (colocated mode: no transport)."""
    return parse_config({"version": 1, "mode": "colocated", "pools": {"colocated": fields}}, "test.yaml")


def test_pool_device_default_and_engine_setting():
    cfg = parse_config({"version": 1})
    assert {cfg.pools.get(r).device for r in Role} == {"auto"}
    assert engine_config(cfg, cfg.pools.decode).device == "cpu"  # auto without GPUs
    assert engine_config(cfg, cfg.pools.decode).pool == "decode"
    gpu = _colocated(num_gpus=1).pools.colocated
    assert gpu.device == "auto" and engine_config(cfg, gpu).device == "cuda"
    assert engine_config(cfg, gpu).pool == "colocated"
    assert engine_config(cfg, _colocated(num_gpus=1, device="cpu").pools.colocated).device == "cpu"
    assert engine_config(cfg, _colocated(num_gpus=2, device="cuda:1").pools.colocated).device == "cuda:1"


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({"device": "gpu"}, "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ({"device": 1}, "expected a non-empty string"),
        ({"device": "cuda"}, "'cuda' needs num_gpus > 0"),
        ({"device": "cuda:1", "num_gpus": 1}, "'cuda:1' is not among the 1 GPU(s) a worker with num_gpus 1 sees"),
    ],
)
def test_pool_device_errors_name_the_field(fields, reason):
    with pytest.raises(ConfigError) as info:
        _colocated(**fields)
    assert info.value.path == "pools.colocated.device" and reason in info.value.reason


def test_gpu_pool_on_a_node_without_one_fails_at_worker_start(tiny, no_cuda):
    """A pool that reserves a GPU (device auto) on a node where torch sees none: the worker's
    start fails with an error naming the pool and the node, never falls back to the CPU."""
    from cluster.worker_actor import WorkerActor
    from decode_workers.colocated_core import ColocatedOptions

    cfg = _colocated(num_gpus=1)
    options = {Role.COLOCATED: ColocatedOptions(engine_config(cfg, cfg.pools.colocated))}
    with pytest.raises(DeviceError, match=r"pool 'colocated' asks for a GPU \(device 'cuda'\), but node local"):
        WorkerActor("c0", None, options, 1, Role.COLOCATED, loaded=tiny)


def test_cuda_transport_needs_gpu_engines():
    gpu = {"num_gpus": 1}
    both = {"prefill": gpu, "decode": {**gpu, "device": "cpu"}}
    with pytest.raises(ConfigError, match="'cuda_ipc' moves KV between GPUs, but pools.decode.device is 'cpu'"):
        parse_config({"version": 1, "pools": both, "transport": {"backend": "cuda_ipc"}}, "test.yaml")
    cfg = parse_config({"version": 1, "pools": {"prefill": gpu, "decode": gpu}, "transport": {"backend": "cuda_ipc"}})
    assert cfg.pools.decode.engine_device() == cfg.pools.prefill.engine_device() == "cuda"


def test_generate_cli_refuses_a_bad_device_before_loading(capsys):
    import argparse

    from engine import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["hi", "--device", "gpu", "--model", "/no/such/model"])) == 2
    assert "EngineConfig.device must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
