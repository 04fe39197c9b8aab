"""The planner proposes only what deploys: TP divides the attention and KV heads, PP is 1, and a
planned YAML for a GPU cluster reserves num_gpus = TP and loads through cluster.config as is."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cluster.config import load_config
from engine.worker_api import Mode, Role
from placement.catalog import model_by_name
from placement.errors import PlanningError
from placement.hardware import load_cluster
from placement.latency_model import PerfModel
from placement.parallelism import PP_NOTE, parallel_degrees
from placement.plan_yaml import write_plan
from placement.search import Plan, PoolPlan, SearchSettings, Searcher, plan_placement
from placement.simulator import Slo

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "placement" / "clusters"


def _settings(**kw):
    base = dict(slo=Slo(1.0, 0.1), max_model_len=4096, fit_sample=100, verify_sample=150, runners_up=0)
    base.update(kw)
    return SearchSettings(**base)


def _perf(model: str, cluster: str | Path) -> PerfModel:
    return PerfModel(model_by_name(model), load_cluster(cluster if isinstance(cluster, Path) else CLUSTERS / cluster))


def test_tp_degrees_divide_attention_and_kv_heads():
    smol = parallel_degrees(model_by_name("SmolLM2-135M"), 8, 8)  # 9 heads, 3 KV heads
    assert smol.tp == (1, 3) and smol.configs == [(1, 1), (3, 1)]
    assert "TP 2, 4-8 left out: do not divide both 9 heads and 3 KV heads" in smol.describe()
    llama = parallel_degrees(model_by_name("Llama-3-8B"), 8, 8)  # 32 heads, 8 KV heads
    assert llama.tp == (1, 2, 4, 8) and all(pp == 1 for _, pp in llama.configs)
    assert "TP 3, 5-7 left out" in llama.describe() and llama.describe().endswith(PP_NOTE)
    # a TP group never spans nodes: the rest of the head divisors are left out with that reason
    small = parallel_degrees(model_by_name("Llama-3-8B"), 2, 8)
    assert small.tp == (1, 2) and "TP 4, 8 left out: a TP group sits on one node of 2 devices" in small.describe()
    assert parallel_degrees(model_by_name("Llama-2-13B"), 8, 8).tp == (1, 2, 4, 5, 8)  # 40 / 40
    assert "above the search's max TP 2" in parallel_degrees(model_by_name("Llama-3-8B"), 8, 2).describe()


def test_search_enumerates_only_deployable_configs(azure):
    assert Searcher(_perf("SmolLM2-135M", "a100-4x8.yaml"), *azure, _settings()).configs() == [(1, 1), (3, 1)]
    llama = Searcher(_perf("Llama-3-8B", "a100-4x8.yaml"), *azure, _settings())
    assert llama.configs() == [(1, 1), (2, 1), (4, 1), (8, 1)]
    # CPU clusters follow the same rule (a TP rank is a process): 2 cores leave SmolLM2 only TP 1
    assert Searcher(_perf("SmolLM2-135M", "local-cpu.yaml"), *azure, _settings(max_model_len=2048)).configs() == [
        (1, 1)
    ]


@pytest.fixture(scope="module")
def llama_a100(azure):
    """A whole search for Llama-3-8B on 4 × 8 A100 at 10 req/s, with its progress lines."""
    perf, settings, lines = _perf("Llama-3-8B", "a100-4x8.yaml"), _settings(rate=10.0), []
    return perf, settings, plan_placement(perf, *azure, settings, lines.append), lines


def test_plans_use_pp_1_and_say_so(llama_a100):
    _, _, result, lines = llama_a100
    assert result.degrees.tp == (1, 2, 4, 8)
    assert all(p.pp == 1 and p.tp in (1, 2, 4, 8) for plan in result.plans for p in plan.pools)
    assert all(c.pp == 1 for c in result.candidates)
    assert any(line.startswith("parallelism: ") and PP_NOTE in line for line in lines)
    # prefill and decode pools are tensor-parallel groups too: nccl sends each decode rank its heads
    assert {c.tp for c in result.candidates if c.role is Role.DECODE} == {1, 2, 4, 8}
    assert {c.tp for c in result.candidates if c.role is Role.PREFILL} == {1, 2, 4, 8}


def _plan(mode: Mode, *pools: PoolPlan, nodes=()) -> Plan:
    return Plan(tuple(pools), mode, False, 10.0, 0.95, 0.96, 0.97, 12.0, nodes)


def _check_loads(path: Path, plan: Plan, gpu: bool):
    cfg = load_config(path)  # what `triptych serve` does with the file
    assert cfg.mode is plan.mode
    for p in plan.pools:
        pool = cfg.pools.get(p.role)
        assert (pool.workers, pool.tensor_parallel, pool.pipeline_parallel) == (p.instances, p.tp, 1)
        assert pool.num_gpus == (pool.tensor_parallel if gpu else 0)
        assert pool.num_cpus == pool.tensor_parallel
    return cfg


@pytest.mark.parametrize(
    "plan",
    [
        _plan(Mode.DISAGGREGATED, PoolPlan(Role.PREFILL, 1, 1, 3), PoolPlan(Role.DECODE, 1, 1, 2)),
        _plan(Mode.DISAGGREGATED, PoolPlan(Role.PREFILL, 2, 1, 3), PoolPlan(Role.DECODE, 4, 1, 2)),
        _plan(Mode.COLOCATED, PoolPlan(Role.COLOCATED, 4, 1, 6)),
        _plan(Mode.COLOCATED, PoolPlan(Role.COLOCATED, 8, 1, 2)),
    ],
    ids=["p1-d1", "p2-d4", "colocated-tp4", "colocated-tp8"],
)
def test_gpu_plan_yaml_reserves_tp_gpus_and_loads(tmp_path, plan):
    perf = _perf("Llama-3-8B", "a100-4x8.yaml")
    out = tmp_path / "plan.yaml"
    write_plan(out, plan, perf, _settings())
    cfg = _check_loads(out, plan, gpu=True)
    # four nodes under one Ray cluster: the KV transport must cross nodes (shm / cuda_ipc would be refused)
    assert cfg.ray.address == "auto" and cfg.transport.backend.value == "nccl"
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any(PP_NOTE in line and "TP 1, 2, 4, 8 considered" in line for line in header)
    assert any("transport.backend nccl" in line for line in header)
    assert any("num_gpus = tensor_parallel" in line for line in header)


def test_searched_gpu_plan_loads(llama_a100, tmp_path):
    perf, settings, result, _ = llama_a100
    for k, plan in enumerate(result.plans):
        write_plan(tmp_path / f"plan{k}.yaml", plan, perf, settings)
        _check_loads(tmp_path / f"plan{k}.yaml", plan, gpu=True)


def test_cpu_plan_yaml_transport_by_node_count(tmp_path):
    plan = _plan(Mode.DISAGGREGATED, PoolPlan(Role.PREFILL, 1, 1, 1), PoolPlan(Role.DECODE, 1, 1, 1))
    one = tmp_path / "one.yaml"
    write_plan(one, plan, _perf("SmolLM2-135M", "local-cpu.yaml"), _settings(max_model_len=2048))
    cfg = _check_loads(one, plan, gpu=False)
    assert (cfg.ray.address, cfg.transport.backend.value) == (None, "shm")
    raw = yaml.safe_load((CLUSTERS / "local-cpu.yaml").read_text())
    (tmp_path / "cpu-3x2.yaml").write_text(yaml.safe_dump({**raw, "name": "cpu-3x2", "num_nodes": 3}))
    many = tmp_path / "many.yaml"
    write_plan(many, plan, _perf("SmolLM2-135M", tmp_path / "cpu-3x2.yaml"), _settings(max_model_len=2048))
    cfg = _check_loads(many, plan, gpu=False)
    assert (cfg.ray.address, cfg.transport.backend.value) == ("auto", "gloo")


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_plan_that_does_not_deploy_is_refused(tmp_path, tp, pp):
    plan = _plan(Mode.COLOCATED, PoolPlan(Role.COLOCATED, tp, pp, 1))
    with pytest.raises(PlanningError, match=f"TP{tp} PP{pp} does not deploy"):
        write_plan(tmp_path / "plan.yaml", plan, _perf("SmolLM2-135M", "a100-4x8.yaml"), _settings())
    assert not (tmp_path / "plan.yaml").exists()
    ok = replace(plan, pools=(PoolPlan(Role.COLOCATED, 3, 1, 1),))  # 3 divides 9 heads and 3 KV heads
    write_plan(tmp_path / "plan.yaml", ok, _perf("SmolLM2-135M", "a100-4x8.yaml"), _settings())
    _check_loads(tmp_path / "plan.yaml", ok, gpu=True)
