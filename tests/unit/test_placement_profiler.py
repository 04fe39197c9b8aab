"""`triptych profile` on a tiny seeded Llama: samples, the recorded TP (real ranks, not threads)
and co-running neighbours."""

import multiprocessing

import pytest
import torch

from tests.helpers.models import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from engine import model_loader

    path = tmp_path_factory.mktemp("tiny-llama-profile")
    tok = AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))
    build_tiny_llama(len(tok), layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _config(model_dir, **extra):
    from cluster.config import parse_config

    return parse_config(
        {
            "version": 1,
            "model": {"path": model_dir, "max_model_len": 1024},
            "engine": {"num_kv_blocks": 256},
            **extra,
        },
        "test",
    )


def test_profile_records_threads_not_as_tp_and_fits(tiny_dir):
    from placement.latency_model import FittedProfile
    from placement.profiler import measure

    before = torch.get_num_threads()
    try:
        profile = measure(_config(tiny_dir), threads=2, quick=True, reps=1)
    finally:
        torch.set_num_threads(before)
    hw = profile.hardware
    assert (hw.device, hw.tensor_parallel, hw.pipeline_parallel, hw.num_devices) == ("cpu", 1, 1, 1)
    assert "2 thread(s)" in hw.description
    assert len(profile.prefill) == 7 and len(profile.decode) >= 3 and len(profile.transfer) == 3
    assert all(s.seconds > 0 for s in profile.prefill + profile.decode)
    fit = FittedProfile.from_profile(profile)
    assert fit.tp == 1 and fit.prefill is not None and fit.decode is not None


def test_profile_at_tp2_runs_real_ranks(tiny_dir, tmp_path):
    """A colocated pool with tensor_parallel 2 is profiled as 2 gloo ranks; the planner uses that
    profile for TP 2 instances."""
    from pathlib import Path

    from placement.cli import perf_model
    from placement.latency_model import FittedProfile
    from placement.profile import save_profile
    from placement.profiler import measure

    cfg = _config(tiny_dir, mode="colocated", pools={"colocated": {"tensor_parallel": 2, "num_cpus": 2}})
    profile = measure(cfg, quick=True, reps=1)
    hw = profile.hardware
    assert (hw.tensor_parallel, hw.num_devices) == (2, 2) and "TP 2 x 1 thread(s)" in hw.description
    assert profile.model.num_heads == 4 and profile.model.num_kv_heads == 2  # the whole model's shape
    assert all(s.seconds > 0 for s in profile.prefill + profile.decode)
    fit = FittedProfile.from_profile(profile)
    assert fit.tp == 2
    with pytest.raises(Exception, match="co-run applies to TP 1"):
        measure(cfg, quick=True, reps=1, co_run=2)
    tp1 = measure(_config(tiny_dir), threads=1, quick=True, reps=1)
    save_profile(tp1, tmp_path / "tp1.json")
    save_profile(profile, tmp_path / "tp2.json")
    cluster = Path(__file__).resolve().parents[2] / "placement" / "clusters" / "local-cpu.yaml"
    perf = perf_model(f"{tmp_path / 'tp1.json'},{tmp_path / 'tp2.json'}", cluster)
    assert perf.profiled(2, 1).tp == 2 and perf.profiled(1, 1).tp == 1


def test_co_run_neighbours_start_and_stop(tiny_dir):
    from placement.profiler import CoRun

    from cluster.controller import engine_config

    cfg = _config(tiny_dir)
    with CoRun(1, tiny_dir, engine_config(cfg, cfg.pools.prefill), 1) as co:
        assert all(p.is_alive() for p in co.procs)
    assert all(not p.is_alive() for p in co.procs)
    assert not [c for c in multiprocessing.active_children() if c in co.procs]


def test_bad_co_run_is_a_planning_error(tiny_dir):
    from placement.errors import PlanningError
    from placement.profiler import measure

    with pytest.raises(PlanningError, match="co-run"):
        measure(_config(tiny_dir), co_run=0)
