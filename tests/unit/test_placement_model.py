"""Latency-model fits, profile round trip, trace loading and cluster files."""

import json
import random
from pathlib import Path

import pytest

from placement import trace as tr
from placement.catalog import model_by_name
from placement.errors import PlanningError
from placement.hardware import load_cluster
from placement.latency_model import (
    FittedProfile,
    PerfModel,
    fit_decode,
    fit_encode,
    fit_prefill,
    fit_transfer,
    roofline,
)
from placement.profile import (
    DecodeSample,
    EncodeSample,
    HardwareInfo,
    PrefillSample,
    Profile,
    TransferSample,
    load_profile,
    save_profile,
)

CLUSTERS = Path(__file__).resolve().parents[2] / "placement" / "clusters"
TRACES = Path("/work/shared/data/traces")


def _synthetic_profile(noise=0.0):
    rng = random.Random(1)
    a, b, c = 0.01, 2e-4, 3e-8
    pre = []
    for _ in range(40):
        lens = tuple(rng.randint(16, 2048) for _ in range(rng.randint(1, 4)))
        t = a + b * sum(lens) + c * sum(l * l for l in lens)
        pre.append(PrefillSample(lens, t * (1 + rng.uniform(-noise, noise))))
    dec = [
        DecodeSample(bs, ctx, 0.005 + 1e-7 * ctx + 4e-4 * bs)
        for bs in (1, 2, 4, 8, 16, 32)
        for ctx in (bs * 128, bs * 1024)
    ]
    enc = [EncodeSample(n, 0.003 + 0.02 * n) for n in (1, 2, 4)]
    xfer = [TransferSample(n, 1e-4 + n / 5e9) for n in (1 << 16, 1 << 20, 1 << 24)]
    return Profile(
        model_by_name("SmolLM2-135M"), HardwareInfo("test", "cpu"), tuple(pre), tuple(dec), tuple(enc), tuple(xfer)
    )


def test_fits_recover_known_coefficients():
    p = _synthetic_profile()
    pre = fit_prefill(p.prefill)
    assert (pre.a, pre.b, pre.c) == pytest.approx((0.01, 2e-4, 3e-8), rel=1e-6)
    dec = fit_decode(p.decode)
    assert (dec.a, dec.b, dec.c) == pytest.approx((0.005, 1e-7, 4e-4), rel=1e-6)
    enc = fit_encode(p.encode)
    assert (enc.a, enc.per_image) == pytest.approx((0.003, 0.02))
    xf = fit_transfer(p.transfer)
    assert xf.latency_s == pytest.approx(1e-4) and xf.bandwidth == pytest.approx(5e9)


def test_fit_with_noise_stays_close_and_nonnegative():
    pre = fit_prefill(_synthetic_profile(noise=0.05).prefill)
    assert min(pre.a, pre.b, pre.c) >= 0
    assert pre.seconds(1024, 1024**2) == pytest.approx(0.01 + 2e-4 * 1024 + 3e-8 * 1024**2, rel=0.05)


def test_fit_needs_enough_samples():
    with pytest.raises(PlanningError, match="prefill samples"):
        fit_prefill(())


def test_profile_round_trip_and_calibrated_perf_model(tmp_path):
    p = _synthetic_profile()
    path = tmp_path / "profile.json"
    save_profile(p, path)
    assert load_profile(path) == p
    perf = PerfModel(p.model, load_cluster(CLUSTERS / "local-cpu.yaml"), FittedProfile.from_profile(p))
    # At the profiled configuration the fitted model is used as is.
    assert perf.instance(1, 1).prefill.b == pytest.approx(2e-4)
    assert perf.transfer(True).bandwidth == pytest.approx(5e9)


def test_bad_profile_is_a_planning_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": 99}))
    with pytest.raises(PlanningError, match="version"):
        load_profile(path)
    with pytest.raises(PlanningError, match="not found"):
        load_profile(tmp_path / "missing.json")


def test_roofline_tp_speeds_up_and_memory_splits():
    cluster = load_cluster(CLUSTERS / "a100-4x8.yaml")
    m = model_by_name("Llama-3-8B")
    t1 = roofline(m, cluster, 1, 1).prefill.seconds(2048, 2048**2)
    t4 = roofline(m, cluster, 4, 1).prefill.seconds(2048, 2048**2)
    assert t1 / 4 < t4 < t1 / 2  # faster, but all-reduce keeps it from a perfect 4x
    perf = PerfModel(model_by_name("Llama-2-70B"), cluster)
    assert perf.kv_capacity_tokens(1, 1) < 0 < perf.kv_capacity_tokens(4, 1)


def test_cluster_files_load():
    for name in ("a100-4x8", "h100-2x8", "local-cpu"):
        c = load_cluster(CLUSTERS / f"{name}.yaml")
        assert c.num_gpus >= 2
    assert load_cluster(CLUSTERS / "a100-4x8.yaml").num_gpus == 32


def test_bad_cluster_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_nodes: 2\ngpus_per_node: 8\ngpu: {name: x, memory_gb: 80, peak_tflops: 1}\n")
    with pytest.raises(PlanningError, match="hbm_bandwidth_gbps"):
        load_cluster(path)


def test_traces_load_and_transform():
    az = tr.load_trace(TRACES / "AzureLLMInferenceTrace_conv_2023.csv")
    mc = tr.load_trace(TRACES / "mooncake_fast25_conversation_trace.jsonl")
    assert len(az) == 19366 and len(mc) == 12031
    assert az[0].arrival_s == 0 and all(x.arrival_s <= y.arrival_s for x, y in zip(az, az[1:1000]))
    assert 5 < tr.stats(az).rate < 6
    part = tr.slice_trace(az, 100, 500)
    assert len(part) == 500 and part[0].arrival_s == 0
    assert tr.stats(tr.rescale_rate(part, 20.0)).rate == pytest.approx(20.0)
    clipped = tr.scale_lengths(mc[:200], 0.5, max_model_len=2048)
    assert all(r.prompt_len + r.output_len <= 2048 for r in clipped)
    fit, held = tr.split(part, 0.5)
    assert len(fit) + len(held) == 500 and held[0].arrival_s == 0


def test_trace_errors(tmp_path):
    with pytest.raises(PlanningError, match="not found"):
        tr.load_trace(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(PlanningError, match="no requests"):
        tr.load_trace(empty)


def test_profile_at_another_tp_is_used_as_is_there():
    """Several profiles of one model: each profiled (TP, PP) uses its own fit, the rest scale from the first."""
    from dataclasses import replace

    p1 = _synthetic_profile()
    # A 2-thread profile that is 1.6x faster, not the 2x the roofline ratio would assume.
    p2 = replace(
        p1,
        hardware=HardwareInfo("test, 2 threads", "cpu", 2, 2, 1),
        prefill=tuple(replace(s, seconds=s.seconds / 1.6) for s in p1.prefill),
        decode=tuple(replace(s, seconds=s.seconds / 1.6) for s in p1.decode),
    )
    cluster = load_cluster(CLUSTERS / "local-cpu.yaml")
    f1, f2 = FittedProfile.from_profile(p1), FittedProfile.from_profile(p2)
    perf = PerfModel(p1.model, cluster, f1, (f2,))
    assert perf.profiled(2, 1) is f2 and perf.profiled(4, 1) is None
    assert perf.instance(1, 1).prefill.b == pytest.approx(2e-4)
    assert perf.instance(2, 1).prefill.b == pytest.approx(2e-4 / 1.6)
    assert perf.instance(2, 1).decode.c == pytest.approx(4e-4 / 1.6)
    only_one = PerfModel(p1.model, cluster, f1)
    assert only_one.instance(2, 1).prefill.b != pytest.approx(2e-4 / 1.6)  # the roofline ratio instead


def test_cli_joins_profiles_and_refuses_mixed_models(tmp_path):
    from dataclasses import replace

    from placement.cli import perf_model

    p1 = _synthetic_profile()
    p2 = replace(p1, hardware=HardwareInfo("2 threads", "cpu", 2, 2, 1))
    save_profile(p1, tmp_path / "a.json")
    save_profile(p2, tmp_path / "b.json")
    perf = perf_model(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", CLUSTERS / "local-cpu.yaml")
    assert perf.profiled(2, 1) is not None and perf.fitted.tp == 1
    save_profile(replace(p1, model=replace(p1.model, name="Other")), tmp_path / "c.json")
    with pytest.raises(PlanningError, match="different models"):
        perf_model(f"{tmp_path / 'a.json'},{tmp_path / 'c.json'}", CLUSTERS / "local-cpu.yaml")
    with pytest.raises(PlanningError, match="same \\(TP, PP\\)"):
        perf_model(f"{tmp_path / 'a.json'},{tmp_path / 'a.json'}", CLUSTERS / "local-cpu.yaml")
