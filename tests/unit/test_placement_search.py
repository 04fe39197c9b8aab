"""Search, YAML output and the `plan` CLI end to end, including infeasible inputs."""

import argparse
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from engine.worker_api import Role
from placement import cli
from placement import trace as tr
from placement.catalog import model_by_name
from placement.errors import PlanningError
from placement.hardware import load_cluster
from placement.latency_model import PerfModel
from placement.plan_yaml import DEPLOY_KEYS, write_plan
from placement.search import SearchSettings, plan_placement
from placement.simulator import Slo
from tests.helpers.traces import AZURE_CONV as AZURE

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "placement" / "clusters"


def _settings(**kw):
    base = dict(slo=Slo(1.0, 0.1), max_model_len=4096, fit_sample=100, verify_sample=150, runners_up=0, max_tp=2)
    base.update(kw)
    return SearchSettings(**base)


def _instances(plan):
    return sum(p.instances for p in plan.pools)


def test_higher_rate_gets_more_instances(azure):
    perf = PerfModel(model_by_name("Llama-3-8B"), load_cluster(CLUSTERS / "a100-4x8.yaml"))
    fit, held = azure
    low = plan_placement(perf, fit, held, _settings(rate=5.0)).chosen
    high = plan_placement(perf, fit, held, _settings(rate=40.0)).chosen
    assert high.num_gpus > low.num_gpus and _instances(high) > _instances(low)
    assert high.attainment >= 0.9 and low.attainment >= 0.9


def test_model_that_fits_nowhere(azure):
    perf = PerfModel(model_by_name("Llama-2-70B"), load_cluster(CLUSTERS / "local-cpu.yaml"))
    with pytest.raises(PlanningError, match="fits on no"):
        plan_placement(perf, *azure, _settings())


def test_slo_nothing_meets(azure):
    perf = PerfModel(model_by_name("Llama-3-8B"), load_cluster(CLUSTERS / "a100-4x8.yaml"))
    with pytest.raises(PlanningError, match="no configuration meets the SLOs"):
        plan_placement(perf, *azure, _settings(slo=Slo(1e-4, 1e-5)))


def test_rate_beyond_cluster(azure):
    perf = PerfModel(model_by_name("Llama-3-8B"), load_cluster(CLUSTERS / "a100-4x8.yaml"))
    with pytest.raises(PlanningError, match="lower --rate"):
        plan_placement(perf, *azure, _settings(rate=1e5))


def test_empty_trace():
    perf = PerfModel(model_by_name("Llama-3-8B"), load_cluster(CLUSTERS / "a100-4x8.yaml"))
    with pytest.raises(PlanningError, match="empty"):
        plan_placement(perf, (), (), _settings())


def test_low_affinity_pairs_stages_on_nodes(azure):
    perf = PerfModel(model_by_name("Llama-3-8B"), load_cluster(CLUSTERS / "a100-4x8.yaml"))
    plan = plan_placement(perf, *azure, _settings(rate=10.0, low_affinity=True)).plans
    disagg = [p for p in plan if p.pool(Role.PREFILL)]
    assert disagg and all(p.pool(Role.PREFILL).pp == p.pool(Role.DECODE).pp == 1 for p in disagg)
    for p in disagg:  # each prefill instance shares a node with its decode partner, so KV stays inside it
        pairs = min(p.pool(Role.PREFILL).instances, p.pool(Role.DECODE).instances)
        for k in range(pairs):
            node = next(n for n in p.nodes if any(x.startswith(f"prefill#{k}/") for x in n))
            assert any(x.startswith(f"decode#{k}/") for x in node)


def test_plan_yaml_loads_through_cluster_config(azure, tmp_path):
    perf = PerfModel(model_by_name("SmolLM2-135M"), load_cluster(CLUSTERS / "local-cpu.yaml"))
    settings = _settings(slo=Slo(30.0, 2.0), rate=0.05)
    reqs = tr.scale_lengths(tr.slice_trace(tr.load_trace(AZURE), 0, 100), 0.25, 2048)
    result = plan_placement(perf, *tr.split(reqs, 0.5), settings)
    out = tmp_path / "plan.yaml"
    write_plan(out, result.chosen, perf, settings)
    doc = yaml.safe_load(out.read_text())
    local = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    assert tuple(doc) == DEPLOY_KEYS and set(doc) == set(local)
    cfg = load_config(out)
    assert cfg.mode.value == result.chosen.mode.value
    for p in result.chosen.pools:
        pool = cfg.pools.get(p.role.value)
        assert (pool.workers, pool.tensor_parallel, pool.pipeline_parallel) == (p.instances, p.tp, p.pp)
    assert cfg.slo.ttft_ms == 30000


def _args(tmp_path, **kw):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = [
        "--model",
        "Llama-3-8B",
        "--cluster",
        str(CLUSTERS / "a100-4x8.yaml"),
        "--trace",
        str(AZURE),
        "--ttft-slo",
        "1",
        "--tpot-slo",
        "0.1",
        "-o",
        str(tmp_path / "plan.yaml"),
    ]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        base = [x for i, x in enumerate(base) if x != flag and (i == 0 or base[i - 1] != flag)] + [flag, str(v)]
    return parser.parse_args(base)


def test_cli_end_to_end_4x8_under_60s(tmp_path, capsys):
    start = time.monotonic()
    assert cli.run(_args(tmp_path, band_slices=2)) == 0  # the default 8 slices: ~45 s here (docs/PLACEMENT.md)
    assert time.monotonic() - start < 60
    out = capsys.readouterr().out
    assert "chosen:" in out and "predicted goodput" in out and "ranked plans" in out
    # every plan has its band over slices of the whole trace; the pick has the best p10 per device
    assert "goodput over 2 slices of the whole trace: median" in out
    header = (tmp_path / "plan.yaml").read_text()
    assert "# Goodput over disjoint slices of the whole trace: median" in header and "(picked on the p10)" in header
    assert "parallelism: TP 1, 2, 4, 8 considered" in out and "PP = 1 only" in out
    assert any("PP = 1 only" in line for line in (tmp_path / "plan.yaml").read_text().splitlines()[:8])
    assert (tmp_path / "plan.png").stat().st_size > 1000
    assert tuple(yaml.safe_load((tmp_path / "plan.yaml").read_text())) == DEPLOY_KEYS


def test_without_matplotlib_the_plan_says_there_is_no_plot(tmp_path, monkeypatch):
    said = []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the `plot` extra
    assert cli._plot(tmp_path / "plan.png", None, None, said.append) is False
    assert said == ["no plot: matplotlib is not installed (pip install 'triptych[plot]')"]
    assert not (tmp_path / "plan.png").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(trace="/nonexistent/trace.csv"), "trace file not found"),
        (dict(cluster="/nonexistent/c.yaml"), "cluster file not found"),
        (dict(model="GPT-9"), "unknown model"),
        (dict(model="/nonexistent/profile.json"), "profile file not found"),
        (dict(ttft_slo=0), "--ttft-slo must be > 0"),
        (dict(trace_count=1), "need >= 2"),
        (dict(model="Llama-2-70B", cluster=CLUSTERS / "local-cpu.yaml"), "fits on no"),
        (dict(ttft_slo=1e-4, tpot_slo=1e-5), "no configuration meets the SLOs"),
        (dict(rate=1e6), "lower --rate"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, change, message):
    assert cli.run(_args(tmp_path, **change)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("[plan ")]  # progress lines aside
    assert len(errors) == 1 and errors[0].startswith("triptych plan: error:") and message in errors[0]
    assert "Traceback" not in err


def test_cli_empty_trace_file_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    assert cli.run(_args(tmp_path, trace=empty)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trace has no requests" in err[0]


def test_bands_rank_plans_by_their_lower_bound_per_device(azure):
    """with_bands: each plan's goodput on disjoint slices (p10 <= median <= p90), ranked by p10
    per device, the colocated plan kept; slices are disjoint and spread over the trace."""
    from placement.search import Searcher

    fit, held = azure
    whole = tr.scale_lengths(tr.slice_trace(tr.load_trace(AZURE), 0, 400), 1.0, 4096)  # what `azure` splits
    perf = PerfModel(model_by_name("Llama-3-8B"), load_cluster(CLUSTERS / "a100-4x8.yaml"))
    searcher = Searcher(perf, fit, held, _settings())
    result = searcher.run()
    slices = tr.slices(whole, 3, 60)
    assert [len(s) for s in slices] == [60, 60, 60]
    assert slices[1][0].prompt_len == whole[len(whole) // 3].prompt_len  # slice i starts at i/k of the trace
    banded = searcher.with_bands(result, slices)
    assert {(p.mode, p.pools) for p in banded.plans} == {(p.mode, p.pools) for p in result.plans}
    assert all(p.band[0] <= p.band[1] <= p.band[2] for p in banded.plans)
    lows = [p.lower_per_gpu for p in banded.plans]
    assert lows == sorted(lows, reverse=True) and banded.chosen.lower_per_gpu == max(lows)
    assert banded.colocated is None or (banded.colocated in banded.plans and banded.colocated.band is not None)
