"""Write a `Plan` as a deploy YAML that `triptych serve` loads unchanged (cluster.config schema).

The top-level keys are those of deploy/local.yaml: version, model, ray, mode, engine, pools,
transport, slo, server, role_switching (written off: a plan is a static placement). What the plan
decides:
- mode: disaggregated | colocated;
- pools.<role>: workers (instances), tensor_parallel = TP, pipeline_parallel = 1, and what one
  worker reserves in Ray for all its TP ranks (one device and one CPU each): num_gpus = TP and
  num_cpus = TP on a GPU cluster, num_cpus = TP and num_gpus 0 on a CPU cluster; resources
  {<role>: 1} so pools land on labelled nodes;
- engine: KV blocks per worker (the smallest instance's KV capacity), token budget, batch size;
- transport: nccl on a GPU cluster (GPU to GPU, within a node and across nodes: shm and cuda_ipc
  work only within one node, and a plan joins a Ray cluster whose pools may sit on different
  nodes); shm on a single CPU node (with a local Ray), gloo across CPU nodes;
- slo: the planning SLOs in ms and the attainment target.
Invariant: a plan whose pools use a (TP, PP) that does not deploy (placement.parallelism) is
refused with a PlanningError rather than written.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from engine.worker_api import Role
from placement.errors import PlanningError
from placement.hardware import ClusterSpec, DeviceKind
from placement.latency_model import PerfModel
from placement.parallelism import degrees_for, parallel_degrees, transport_backend
from placement.search import Plan, SearchSettings

DEPLOY_KEYS = ("version", "model", "ray", "mode", "engine", "pools", "transport", "slo", "server", "role_switching")


def plan_document(plan: Plan, perf: PerfModel, settings: SearchSettings, model_path: str | None = None) -> dict:
    """The deploy document as plain YAML data (only str/int/float/bool/None/list/dict)."""
    cluster: ClusterSpec = perf.cluster
    gpu = cluster.device is DeviceKind.GPU
    degrees = parallel_degrees(perf.model, cluster.gpus_per_node, settings.max_tp)
    for p in plan.pools:
        if (p.tp, p.pp) not in degrees_for(p.role, degrees.configs, cluster):
            raise PlanningError(
                f"{p.role.value} TP{p.tp} PP{p.pp} does not deploy on {cluster.name}: {degrees.describe()}"
            )
    single = cluster.num_nodes == 1
    blocks = min(perf.kv_capacity_tokens(p.tp, p.pp) // settings.block_size for p in plan.pools)
    pools: dict[str, dict] = {"encode": {"workers": 0}}
    for p in plan.pools:
        devices = p.tp * p.pp  # = TP: PP is 1
        entry = {
            "workers": p.instances,
            "num_cpus": devices,
            "num_gpus": devices if gpu else 0,
            "resources": {p.role.value: 1},
            "tensor_parallel": p.tp,
            "pipeline_parallel": p.pp,
        }
        if p.role in (Role.PREFILL, Role.COLOCATED):
            entry["sparse"] = {"method": "dense"}
        pools[p.role.value] = entry
    backend = transport_backend(cluster)
    local = single and not gpu
    dtype = "float32" if perf.model.bytes_per_param >= 4 else ("bfloat16" if gpu else "float16")
    return {
        "version": 1,
        "model": {"path": model_path, "dtype": dtype, "max_model_len": settings.max_model_len},
        "ray": {"address": None if local else "auto", "num_cpus": max(4, cluster.num_gpus + 2) if local else None},
        "mode": plan.mode.value,
        "engine": {
            "block_size": settings.block_size,
            "num_kv_blocks": int(min(blocks, 1 << 24)),
            "max_num_batched_tokens": settings.token_budget,
            "max_num_seqs": settings.max_batch,
        },
        "pools": pools,
        "transport": {"backend": backend, "streaming": True},
        "slo": {
            "ttft_ms": round(settings.slo.ttft_s * 1000, 3),
            "tpot_ms": round(settings.slo.tpot_s * 1000, 3),
            "attainment": settings.target_attainment,
        },
        "server": {
            "host": "127.0.0.1" if local else "0.0.0.0",
            "grpc_port": 50051,
            "http_port": 8000,
            "max_queued_requests": 256,
            "request_timeout_s": 300,
        },
        "role_switching": {"enabled": False},
    }


_TRANSPORT_WHY = {
    "nccl": "GPU to GPU within and across nodes (shm and cuda_ipc work only within one node)",
    "shm": "shared memory: every pool is on this one node, under a local Ray",
    "gloo": "TCP between CPU nodes (shm works only within one node)",
}


def write_plan(
    path: str | Path, plan: Plan, perf: PerfModel, settings: SearchSettings, model_path: str | None = None
) -> None:
    """Write the deploy YAML with a comment header summarising the plan's prediction."""
    doc = plan_document(plan, perf, settings, model_path)
    gpu = perf.cluster.device is DeviceKind.GPU
    device, device_key = ("GPU", "gpus") if gpu else ("CPU core", "cpus")
    backend = doc["transport"]["backend"]
    header = [
        f"# Written by `triptych plan` for {perf.model.name} on cluster {perf.cluster.name}.",
        f"# Placement: {plan.describe()} on {plan.num_gpus} of {perf.cluster.num_gpus} devices"
        f"{' (low node affinity)' if plan.low_affinity else ''}.",
        f"# Predicted (simulation): goodput {plan.goodput:.3g} req/s ({plan.goodput_per_gpu:.3g} per device); "
        f"attainment {plan.attainment:.1%} at {plan.rate:.3g} req/s.",
        *(
            [f"# Goodput over disjoint slices of the whole trace: {plan.describe_band()} (picked on the p10)."]
            if plan.band
            else []
        ),
        "# A plan is only trusted once this prediction has been compared with the measured goodput.",
        f"# Parallelism: {parallel_degrees(perf.model, perf.cluster.gpus_per_node, settings.max_tp).describe()}.",
        f"# Each worker reserves one {device} per TP rank (num_{device_key} = tensor_parallel).",
        f"# transport.backend {backend}: {_TRANSPORT_WHY[backend]}.",
    ]
    for n, names in enumerate(plan.nodes):
        header.append(f"# node {n}: {', '.join(names) if names else '(idle)'}")
    if model_path is None and perf.model.name != "SmolLM2-135M":
        header.append(f"# model.path is null (the embedded SmolLM2): set it to {perf.model.name}'s local directory.")
    Path(path).write_text("\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
