"""Simulator against closed forms: M/D/1 waiting time, single-request TTFT, KV admission limits."""

import math
import random

import pytest

from engine.worker_api import Mode
from placement.latency_model import DecodeModel, EncodeModel, InstanceLatency, PrefillModel, TransferModel
from placement.simulator import SimConfig, SimulatedPool, Slo, simulate
from placement.trace import Request

NO_SLO = Slo(math.inf, math.inf)


def _lat(prefill=PrefillModel(0.1, 0.0, 0.0), decode=DecodeModel(0.01, 0.0, 0.0), pp=1):
    return InstanceLatency(1, pp, prefill, decode, EncodeModel(0.0, 0.0))


def test_md1_mean_wait_matches_pollaczek_khinchine():
    d, rho = 0.1, 0.5
    rng = random.Random(0)
    t, reqs = 0.0, []
    for _ in range(50000):
        t += rng.expovariate(rho / d)
        reqs.append(Request(t, 100, 1))
    # token_budget = prompt length: every batch holds exactly one request, service time D.
    cfg = SimConfig(Mode.DISAGGREGATED, NO_SLO, prefill=SimulatedPool(1, _lat(PrefillModel(d, 0, 0)), token_budget=100))
    res = simulate(cfg, tuple(reqs))
    wait = sum(r.ttft_s for r in res.results) / len(reqs) - d
    assert wait == pytest.approx(rho * d / (2 * (1 - rho)), rel=0.03)


def test_single_request_ttft_is_prefill_plus_transfer_exactly():
    pre = PrefillModel(0.05, 1e-4, 1e-8)
    transfer = TransferModel(0.002, 1e9)
    kv = 1000
    cfg = SimConfig(
        Mode.DISAGGREGATED,
        NO_SLO,
        prefill=SimulatedPool(1, _lat(pre)),
        decode=SimulatedPool(1, _lat()),
        transfer=transfer,
        kv_bytes_per_token=kv,
    )
    r = simulate(cfg, (Request(0.0, 500, 11),)).results[0]
    ttft = pre.seconds(500, 500**2) + transfer.seconds(500 * kv)
    assert r.ttft_s == ttft
    assert r.tpot_s == pytest.approx(0.01)  # 10 decode steps of a constant 10 ms
    assert r.e2e_s == pytest.approx(ttft + 0.1)


def test_decode_step_time_follows_batch_and_context():
    dec = DecodeModel(0.01, 1e-5, 1e-3)
    cfg = SimConfig(Mode.DISAGGREGATED, NO_SLO, decode=SimulatedPool(1, _lat(decode=dec)))
    r = simulate(cfg, (Request(0.0, 100, 3),)).results[0]
    # Two steps with batch 1 and context 101, then 102.
    assert r.tpot_s == pytest.approx((dec.seconds(1, 101) + dec.seconds(1, 102)) / 2)


def test_decode_kv_limit_makes_requests_wait():
    # 64 tokens of KV = 4 blocks; each request needs 48 tokens = 3 blocks, so only one runs at a time.
    lat = _lat(decode=DecodeModel(0.01, 0, 0))
    reqs = (Request(0.0, 32, 16), Request(0.0, 32, 16))
    roomy = simulate(SimConfig(Mode.DISAGGREGATED, NO_SLO, decode=SimulatedPool(1, lat, kv_capacity_tokens=1024)), reqs)
    tight = simulate(SimConfig(Mode.DISAGGREGATED, NO_SLO, decode=SimulatedPool(1, lat, kv_capacity_tokens=64)), reqs)
    assert roomy.results[1].ttft_s == pytest.approx(0.0)
    assert tight.results[1].ttft_s == pytest.approx(15 * 0.01)  # waits for the first one's 15 steps
    assert tight.results[1].tpot_s == pytest.approx(0.01)


def test_request_larger_than_kv_pool_fails_instead_of_hanging():
    cfg = SimConfig(Mode.DISAGGREGATED, NO_SLO, decode=SimulatedPool(1, _lat(), kv_capacity_tokens=32))
    res = simulate(cfg, (Request(0.0, 100, 10), Request(0.0, 8, 2)))
    assert math.isinf(res.results[0].ttft_s) and res.results[1].ttft_s == pytest.approx(0.0)
    assert res.attainment == 0.5


def test_colocated_single_request_chunked_prefill():
    pre, dec = PrefillModel(0.02, 1e-4, 0.0), DecodeModel(0.01, 0.0, 0.0)
    cfg = SimConfig(Mode.COLOCATED, NO_SLO, colocated=SimulatedPool(1, _lat(pre, dec), token_budget=256))
    r = simulate(cfg, (Request(0.0, 600, 4),)).results[0]
    # Chunks of 256, 256, 88 tokens, one iteration each, then 3 decode steps.
    assert r.ttft_s == pytest.approx(3 * 0.02 + 600 * 1e-4)
    assert r.tpot_s == pytest.approx(0.01)


def test_pipeline_parallel_prefill_overlaps_batches():
    reqs = tuple(Request(0.0, 100, 1) for _ in range(4))
    one = simulate(SimConfig(Mode.DISAGGREGATED, NO_SLO, prefill=SimulatedPool(1, _lat(pp=1), token_budget=100)), reqs)
    two = simulate(SimConfig(Mode.DISAGGREGATED, NO_SLO, prefill=SimulatedPool(1, _lat(pp=2), token_budget=100)), reqs)
    assert max(r.ttft_s for r in one.results) == pytest.approx(0.4)
    assert max(r.ttft_s for r in two.results) == pytest.approx(0.1 + 3 * 0.05)


def test_early_stop_reports_upper_bound_below_target():
    reqs = tuple(Request(i * 0.01, 100, 1) for i in range(200))  # 100 req/s into a 10 req/s server
    cfg = SimConfig(Mode.DISAGGREGATED, Slo(0.5, math.inf), prefill=SimulatedPool(1, _lat(), token_budget=100))
    res = simulate(cfg, reqs, min_attainment=0.9)
    assert not res.complete and res.attainment < 0.9
