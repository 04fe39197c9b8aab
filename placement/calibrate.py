"""Calibrating the roofline prior's efficiency terms on measured GPU latencies.

    python -m placement.calibrate [--csv PATH]

The data: `../shared/data/profiles/splitwise_perf_model.csv`, measured prompt (prefill) and
per-token (decode step) times of Llama-2-70B at TP 2, 4, 8 and BLOOM-176B at TP 8 on A100-80GB and
H100-80GB (five repeats of each configuration; prompt 128-8192 tokens, batch 1-64, output
128-8192 tokens). Which rows are used:
- the power-capped H100 (`h100-80gb-pcap`) is left out: it does not run at the clocks the cluster
  file's peak numbers assume;
- a row faster than the hardware allows is left out: a prefill in less time than its linear
  layers' FLOPs take at the GPUs' peak, or a decode step in less time than reading the weights
  at peak HBM bandwidth (Llama-2-70B at TP 2 with a batch of 64 prompts: 0.8 s for 32K tokens,
  where the peak allows no less than 7.2 s);
- a row whose prompt or token time is more than 3 median absolute deviations (and 5%) from the
  median of its configuration's repeats is an outlier of measurement, and is left out.

The fit: the roofline prior (placement/latency_model.py `roofline`) is linear in the reciprocals of
its three efficiencies (compute, HBM bandwidth, all-reduce), so for every row its time is
A/e_bw + B/e_compute + C/e_allreduce + D, with A..D read off the prior itself (no second copy of
its formulas). The efficiencies minimise the squared relative error over the rows (non-negative
least squares), prefill rows (prompt_time of a batch of B prompts of P tokens) and decode rows
(token_time: one step of B sequences holding on average P + T/2 tokens each) together, each kind
weighing the same. Efficiencies above 1 are capped at 1.

What is reported: for each (model, GPU, TP), the median absolute error of prefill and decode times
on its rows when fitted on the *other* (model, TP) groups of the same GPU only (leave one group
out), so no number is an error on the data it was fitted on. `CALIBRATED` holds the terms fitted
on all rows of each GPU; the cluster files (placement/clusters/*.yaml) carry them and a test keeps
the two in step.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from placement.catalog import model_by_name
from placement.hardware import ClusterSpec, load_cluster
from placement.latency_model import _nonneg_lstsq, roofline
from placement.profile import ModelShape

CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiles" / "splitwise_perf_model.csv"
CLUSTERS = Path(__file__).resolve().parent / "clusters"
HARDWARE = {"a100-80gb": "a100-4x8.yaml", "h100-80gb": "h100-2x8.yaml"}  # the GPU's cluster file
MODELS = {"llama2-70b": "Llama-2-70B", "bloom-176b": "BLOOM-176B"}
LEFT_OUT_HARDWARE = ("h100-80gb-pcap",)
MAD_LIMIT, MIN_DEVIATION = 3.0, 0.05
GOAL = 0.15  # median absolute error of prefill and decode times on rows not fitted on
KINDS = ("prefill", "decode")


@dataclass(frozen=True)
class Row:
    model: str
    hardware: str
    tp: int
    prompt: int
    batch: int
    tokens: int
    prefill_s: float
    decode_s: float

    @property
    def group(self) -> tuple[str, int]:
        return self.model, self.tp

    def seconds(self, kind: str) -> float:
        return self.prefill_s if kind == "prefill" else self.decode_s


@dataclass(frozen=True)
class Efficiencies:
    compute: float
    bandwidth: float
    allreduce: float
    layer_overhead_s: float
    hop_latency_s: float  # one step of a ring all-reduce inside a node (the file's intra_node_latency_us)

    def apply(self, cluster: ClusterSpec) -> ClusterSpec:
        gpu = dataclasses.replace(
            cluster.gpu,
            compute_efficiency=self.compute,
            bandwidth_efficiency=self.bandwidth,
            layer_overhead_s=self.layer_overhead_s,
        )
        return dataclasses.replace(
            cluster, gpu=gpu, allreduce_efficiency=self.allreduce, intra_node_latency=self.hop_latency_s
        )


def possible(row: Row) -> bool:
    """Not faster than the GPUs' peak compute (prefill) or peak memory bandwidth (decode) allows."""
    model, gpu = model_by_name(MODELS[row.model]), load_cluster(CLUSTERS / HARDWARE[row.hardware]).gpu
    prefill_floor = 2 * model.num_params * row.batch * row.prompt / (row.tp * gpu.peak_flops)
    decode_floor = model.weight_bytes / (row.tp * gpu.hbm_bandwidth)
    return row.prefill_s >= prefill_floor and row.decode_s >= decode_floor


def load_rows(path: Path = CSV) -> tuple[list[Row], int]:
    """The rows used, and how many were left out as impossible or outliers (the power-capped GPU
    aside)."""
    raw = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["hardware"] in LEFT_OUT_HARDWARE:
                continue
            raw.append(
                Row(
                    r["model"],
                    r["hardware"],
                    int(r["tensor_parallel"]),
                    int(r["prompt_size"]),
                    int(r["batch_size"]),
                    int(r["token_size"]),
                    float(r["prompt_time"]) / 1e3,
                    float(r["token_time"]) / 1e3,
                )
            )
    repeats: dict[tuple, list[Row]] = defaultdict(list)
    for row in raw:
        repeats[(row.model, row.hardware, row.tp, row.prompt, row.batch, row.tokens)].append(row)
    kept = []
    for rows in repeats.values():
        bounds = {}
        for kind in KINDS:
            values = [r.seconds(kind) for r in rows]
            med = statistics.median(values)
            mad = statistics.median(abs(v - med) for v in values)
            bounds[kind] = (med, max(MAD_LIMIT * mad, MIN_DEVIATION * med))
        kept += [
            r for r in rows if possible(r) and all(abs(r.seconds(k) - bounds[k][0]) <= bounds[k][1] for k in KINDS)
        ]
    return kept, len(raw) - len(kept)


def predict(cluster: ClusterSpec, model: ModelShape, row: Row, kind: str) -> float:
    """The roofline prior's time for a row: a batch's prefill, or one decode step."""
    inst = roofline(model, cluster, row.tp, 1)
    if kind == "prefill":
        return inst.prefill.seconds(row.batch * row.prompt, row.batch * row.prompt**2)
    return inst.decode.seconds(row.batch, row.batch * (row.prompt + row.tokens / 2))


def _terms(cluster: ClusterSpec, model: ModelShape, row: Row, kind: str) -> np.ndarray:
    """(A, B, C, E, H, D): the time is A/e_bw + B/e_compute + C/e_allreduce + E·layer overhead +
    H·hop latency + D, linear in each."""

    def at(x_bw: float, x_c: float, x_ar: float, overhead: float, hop: float) -> float:
        return predict(Efficiencies(1 / x_c, 1 / x_bw, 1 / x_ar, overhead, hop).apply(cluster), model, row, kind)

    base = at(1, 1, 1, 0.0, 0.0)
    a, b, c = at(2, 1, 1, 0.0, 0.0) - base, at(1, 2, 1, 0.0, 0.0) - base, at(1, 1, 2, 0.0, 0.0) - base
    e, h = at(1, 1, 1, 1.0, 0.0) - base, at(1, 1, 1, 0.0, 1.0) - base
    return np.array([a, b, c, e, h, base - a - b - c])


def fit(rows: list[Row], cluster: ClusterSpec) -> Efficiencies:
    """The efficiencies minimising the squared relative error over `rows` (module docstring)."""
    xs, ys = [], []
    for kind in KINDS:
        weight = 1.0 / np.sqrt(len(rows))  # each kind weighs the same (both have a time per row)
        for row in rows:
            *terms, d = _terms(cluster, model_by_name(MODELS[row.model]), row, kind)
            y = row.seconds(kind)
            xs.append(np.array(terms) / y * weight)
            ys.append((1 - d / y) * weight)
    x, y = np.array(xs), np.array(ys)
    # An efficiency the fit puts above 1 is held at 1 (its term moves to the constant) and the rest refitted.
    held: dict[int, float] = {}
    while True:
        free = [i for i in range(x.shape[1]) if i not in held]
        rhs = y - sum(x[:, i] * v for i, v in held.items())
        sol = dict(zip(free, _nonneg_lstsq(x[:, free], rhs)))
        over = [i for i in free if i < 3 and sol[i] < 1.0]  # reciprocal < 1: efficiency > 1
        if not over:
            break
        held.update({i: 1.0 for i in over})
    sol.update(held)
    x_bw, x_c, x_ar = (sol[i] for i in range(3))
    effs = (1 / v if v > 0 else 1.0 for v in (x_c, x_bw, x_ar))
    return Efficiencies(*effs, float(sol[3]), float(sol[4]))


def relative_errors(rows: list[Row], cluster: ClusterSpec, kind: str) -> list[float]:
    return [predict(cluster, model_by_name(MODELS[r.model]), r, kind) / r.seconds(kind) - 1 for r in rows]


@dataclass(frozen=True)
class HeldOut:
    hardware: str
    model: str
    tp: int
    rows: int
    prefill: float  # median absolute relative error
    decode: float
    before_prefill: float  # the same with the cluster file's hand-set efficiencies
    before_decode: float


def held_out(rows: list[Row], hardware: str, base: ClusterSpec) -> tuple[list[HeldOut], dict[str, float]]:
    """Leave each (model, TP) group of a GPU out in turn: fit on the others, measure on it. Returns
    the groups, and the median absolute error over every row of the GPU, each predicted by the fit
    that left its group out."""
    mine = [r for r in rows if r.hardware == hardware]
    groups = []
    pooled: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for group in sorted({r.group for r in mine}):
        test = [r for r in mine if r.group == group]
        fitted = fit([r for r in mine if r.group != group], base).apply(base)
        errors = {kind: [abs(e) for e in relative_errors(test, fitted, kind)] for kind in KINDS}
        before = {kind: [abs(e) for e in relative_errors(test, base, kind)] for kind in KINDS}
        for kind in KINDS:
            pooled[kind] += errors[kind]
        med = statistics.median
        groups.append(
            HeldOut(
                hardware,
                group[0],
                group[1],
                len(test),
                med(errors["prefill"]),
                med(errors["decode"]),
                med(before["prefill"]),
                med(before["decode"]),
            )
        )
    return groups, {kind: statistics.median(v) for kind, v in pooled.items()}


# What the cluster files said before calibration (hand-set guesses), for the comparison printed.
UNCALIBRATED = {
    "a100-80gb": Efficiencies(0.5, 0.8, 1.0, 10e-6, 5e-6),
    "h100-80gb": Efficiencies(0.45, 0.8, 1.0, 10e-6, 4e-6),
}


def base_cluster(hardware: str) -> ClusterSpec:
    """The GPU's cluster file with its efficiencies as they were before calibration."""
    return UNCALIBRATED[hardware].apply(load_cluster(CLUSTERS / HARDWARE[hardware]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m placement.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=CSV, help="measured latencies (splitwise_perf_model.csv format)")
    args = parser.parse_args(argv)
    rows, outliers = load_rows(args.csv)
    print(f"{len(rows)} rows used, {outliers} outliers left out (power-capped H100 rows not used)")
    for hardware in HARDWARE:
        base = base_cluster(hardware)
        eff = fit([r for r in rows if r.hardware == hardware], base)
        print(
            f"\n{hardware} ({HARDWARE[hardware]}): compute_efficiency {eff.compute:.3f}, "
            f"bandwidth_efficiency {eff.bandwidth:.3f}, allreduce_efficiency {eff.allreduce:.3f}, "
            f"layer_overhead_us {eff.layer_overhead_s * 1e6:.1f}, intra_node_latency_us {eff.hop_latency_s * 1e6:.1f} (all rows)"
        )
        print("  held out (fitted on the other groups)   prefill err   decode err   (uncalibrated: prefill, decode)")
        groups, pooled = held_out(rows, hardware, base)
        for h in groups:
            print(
                f"  {h.model:<11} TP{h.tp}  {h.rows:>3} rows                 {h.prefill:>8.1%}    {h.decode:>8.1%}"
                f"     ({h.before_prefill:.1%}, {h.before_decode:.1%})"
            )
        print(f"  every held-out row                      {pooled['prefill']:>8.1%}    {pooled['decode']:>8.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
