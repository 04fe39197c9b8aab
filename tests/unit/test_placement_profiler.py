"""`triptych profile` on a tiny seeded Llama: samples, the recorded TP (threads) and co-running neighbours."""

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


def _config(model_dir):
    from cluster.config import parse_config

    return parse_config(
        {"version": 1, "model": {"path": model_dir, "max_model_len": 1024}, "engine": {"num_kv_blocks": 256}}, "test"
    )


def test_profile_records_threads_as_tp_and_fits(tiny_dir):
    from placement.latency_model import FittedProfile
    from placement.profiler import measure

    before = torch.get_num_threads()
    try:
        profile = measure(_config(tiny_dir), threads=2, quick=True, reps=1)
    finally:
        torch.set_num_threads(before)
    hw = profile.hardware
    assert (hw.device, hw.tensor_parallel, hw.pipeline_parallel, hw.num_devices) == ("cpu", 2, 1, 2)
    assert len(profile.prefill) == 7 and len(profile.decode) >= 3 and len(profile.transfer) == 3
    assert all(s.seconds > 0 for s in profile.prefill + profile.decode)
    fit = FittedProfile.from_profile(profile)
    assert fit.tp == 2 and fit.prefill is not None and fit.decode is not None


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
