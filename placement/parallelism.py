"""The parallel degrees a plan may use: only those a deployment builds.

A worker with `tensor_parallel: t` is t rank actors packed on one node (a Ray placement group),
each holding num_heads / t attention heads and num_kv_heads / t KV heads of every layer, so t must
divide both head counts (a KV head is never split or copied between ranks) and t <= devices per
node. Pipeline parallelism is not built (a worker runs every layer), so PP is 1. Prefill and
decode workers are tensor-parallel groups where the plan's KV transport moves KV between groups
(`degrees_for`; shm, gloo and nccl, the transports a plan uses, all do: kv_transfer/registry.py).

`parallel_degrees` answers which TP degrees the search enumerates, and says why every other
degree up to the cap was left out; the CLI, the plot and the deploy YAML print that answer.
Memory is checked later, per degree, by the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.tensor_parallel import TP_ROLES
from engine.worker_api import Role
from kv_transfer.registry import transport_info
from placement.hardware import ClusterSpec, DeviceKind
from placement.profile import ModelShape

# The only pipeline degree the engine builds; a plan never proposes another.
PIPELINE_PARALLEL = 1
PP_NOTE = "PP = 1 only: pipeline parallelism is not built"


def transport_backend(cluster: ClusterSpec) -> str:
    """The KV transport a plan on `cluster` deploys with (placement/plan_yaml.py says why)."""
    if cluster.device is DeviceKind.GPU:
        return "nccl"
    return "shm" if cluster.num_nodes == 1 else "gloo"


def degrees_for(role: Role, configs: list[tuple[int, int]], cluster: ClusterSpec) -> list[tuple[int, int]]:
    """The (TP, PP) of `configs` a pool of `role` deploys with on `cluster`: tensor-parallel groups
    in the pools with a language model, prefill and decode ones when the plan's transport connects
    them (kv_transfer/registry.py; every transport a plan picks does)."""
    if role not in TP_ROLES:
        return [(t, p) for t, p in configs if t == 1]
    if role is Role.COLOCATED or transport_info(transport_backend(cluster)).tensor_parallel:
        return configs
    return [(t, p) for t, p in configs if t == 1]


@dataclass(frozen=True)
class ParallelDegrees:
    """TP degrees the search enumerates (ascending, each with PP 1), and the degrees left out
    with the reason, as (degrees, reason) groups."""

    tp: tuple[int, ...]
    left_out: tuple[tuple[tuple[int, ...], str], ...]
    heads: int
    kv_heads: int

    @property
    def configs(self) -> list[tuple[int, int]]:
        """(TP, PP) pairs, before the memory check."""
        return [(t, PIPELINE_PARALLEL) for t in self.tp]

    def describe(self) -> str:
        """One line: what was considered, what was left out and why, and the PP note."""
        parts = [f"TP {_ranges(self.tp)} considered (divide {self.heads} heads and {self.kv_heads} KV heads)"]
        parts += [f"TP {_ranges(d)} left out: {why}" for d, why in self.left_out]
        return "; ".join(parts + [PP_NOTE])

    def short(self) -> str:
        """A few words for a plot title."""
        return f"TP ∈ {{{', '.join(map(str, self.tp))}}}, PP 1 only (pipeline parallelism is not built)"


def parallel_degrees(model: ModelShape, devices_per_node: int, max_tp: int) -> ParallelDegrees:
    """TP degrees t <= min(max_tp, devices_per_node) dividing both model.num_heads and
    model.num_kv_heads. Never empty: TP 1 always qualifies."""
    h, kv = model.num_heads, model.num_kv_heads
    cap = max(1, min(max_tp, devices_per_node))
    tp = tuple(t for t in range(1, cap + 1) if h % t == 0 and kv % t == 0)
    left: list[tuple[tuple[int, ...], str]] = []
    nondividing = tuple(t for t in range(2, cap + 1) if t not in tp)
    if nondividing:
        left.append((nondividing, f"do not divide both {h} heads and {kv} KV heads"))
    g = math.gcd(h, kv)
    beyond = tuple(t for t in range(cap + 1, g + 1) if g % t == 0)
    if beyond:
        why = (
            f"a TP group sits on one node of {devices_per_node} devices"
            if cap == devices_per_node
            else f"above the search's max TP {max_tp}"
        )
        left.append((beyond, why))
    return ParallelDegrees(tp, tuple(left), h, kv)


def _ranges(values: tuple[int, ...]) -> str:
    """(1, 2, 3, 5, 7, 8) -> "1-3, 5, 7-8"; runs of three or more collapse."""
    out: list[str] = []
    run: list[int] = []
    for v in (*values, None):
        if run and v is not None and v == run[-1] + 1:
            run.append(v)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) >= 3 else ", ".join(map(str, run)))
        run = [v] if v is not None else []
    return ", ".join(out)
