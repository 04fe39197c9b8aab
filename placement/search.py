"""Goodput-optimal placement search (DistServe Algorithms 1 and 2) over simulated pools.

Steps (`plan_placement`):
1. Enumerate the (TP, PP) that deploy (placement.parallelism): TP divides both the attention and
   the KV heads and fits in one node; PP is 1, since pipeline parallelism is not built. Keep those
   whose weights/TP fit a device and whose KV holds at least one max_model_len sequence. The same
   rule holds on a CPU cluster, where a TP rank is a process with one core.
2. Per candidate and phase, binary-search its goodput: the highest rate (req/s) at which a single
   instance keeps >= 90% of the fit sample within the phase's SLO (prefill: TTFT incl. KV transfer;
   decode: TPOT; colocated: both). The fit sample is rescaled to each probed rate.
3. Keep the best goodput per GPU; replicate to the target rate (or, without one, to the largest
   rate the cluster's GPUs hold). Algorithm 1 (default) places instances independently, KV crosses
   nodes. Algorithm 2 (low affinity) pairs a prefill and a decode instance on one node, so the KV
   transfer stays inside a node. (The simulator and latency model still model PP > 1; the search
   never proposes it.)
4. Verify each assembled plan on the held-out sample at the target rate in the full simulator; while
   it misses 90%, add an instance to the pool whose SLO attains less. Then binary-search the whole
   plan's goodput on held-out requests. The colocated alternative goes through the same steps.
5. Rank plans by simulated goodput per GPU; the first is the pick.
Progress goes to the `progress` callback, one line per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from engine.worker_api import Mode, Role
from placement.errors import PlanningError
from placement.latency_model import PerfModel, TransferModel
from placement.parallelism import ParallelDegrees, degrees_for, parallel_degrees
from placement.simulator import SimConfig, SimResult, SimulatedPool, Slo, simulate
from placement.trace import Request, rescale_rate, stats


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of the search. Rates in req/s, SLOs in seconds, sizes in tokens/requests."""

    slo: Slo
    max_model_len: int
    rate: float | None = None
    low_affinity: bool = False
    target_attainment: float = 0.9
    fit_sample: int = 300  # requests per per-phase simulation
    verify_sample: int = 600  # held-out requests per whole-cluster simulation
    token_budget: int = 2048  # prefill batch / colocated iteration token budget
    max_batch: int = 256  # sequences per decode lane
    block_size: int = 16
    max_added_instances: int = 16
    max_tp: int = 8  # TP degrees above this are not searched (nor above the devices of a node)
    runners_up: int = 3  # disaggregated combinations verified besides the best
    min_window_slos: float = 10.0  # simulated span >= this many TTFT SLOs (see Searcher.window)
    max_window: int = 6000  # cap on requests per simulation


@dataclass(frozen=True)
class PhaseCandidate:
    role: Role
    tp: int
    pp: int
    goodput: float  # req/s of one instance at >= target attainment

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    @property
    def per_gpu(self) -> float:
        return self.goodput / self.gpus


@dataclass(frozen=True)
class PoolPlan:
    role: Role
    tp: int
    pp: int
    instances: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.instances


@dataclass(frozen=True)
class Plan:
    """A placement and its simulated quality. rate: the rate it was verified at (req/s)."""

    pools: tuple[PoolPlan, ...]
    mode: Mode
    low_affinity: bool
    rate: float
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    goodput: float
    nodes: tuple[tuple[str, ...], ...] = ()  # per node: "prefill#0/stage0 (tp=2)" entries
    # goodput (req/s) over disjoint slices of the whole trace: (p10, median, p90); Searcher.band
    band: tuple[float, float, float] | None = None

    @property
    def num_gpus(self) -> int:
        return sum(p.gpus for p in self.pools)

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.num_gpus

    @property
    def lower_per_gpu(self) -> float:
        """The band's p10 per device (the goodput without a band): what the pick maximises."""
        return (self.band[0] if self.band else self.goodput) / self.num_gpus

    def describe_band(self) -> str:
        if self.band is None:
            return "no band"
        lo, mid, hi = self.band
        return f"median {mid:.3g} req/s, p10-p90 {lo:.3g}-{hi:.3g}"

    def pool(self, role: Role) -> PoolPlan | None:
        return next((p for p in self.pools if p.role is role), None)

    def describe(self) -> str:
        parts = [f"{p.role.value} {p.instances}×(TP{p.tp},PP{p.pp})" for p in self.pools if p.instances]
        return ", ".join(parts)


@dataclass(frozen=True)
class SearchResult:
    plans: tuple[Plan, ...]  # ranked, best first
    colocated: Plan | None  # best colocated plan (also inside plans)
    candidates: tuple[PhaseCandidate, ...]
    degrees: ParallelDegrees  # the TP degrees searched and why others were left out

    @property
    def chosen(self) -> Plan:
        return self.plans[0]


class Searcher:
    """Holds the inputs and a cache of per-phase goodputs; `run()` does the whole search."""

    def __init__(
        self,
        perf: PerfModel,
        fit: tuple[Request, ...],
        held_out: tuple[Request, ...],
        settings: SearchSettings,
        progress: Callable[[str], None] = lambda s: None,
    ):
        if not fit or not held_out:
            raise PlanningError("trace is empty after scaling and slicing; nothing to plan for")
        self.perf, self.s, self.progress = perf, settings, progress
        self.fit = fit[: settings.fit_sample]
        self.held = held_out[: settings.verify_sample]
        self.cluster = perf.cluster
        self.images = any(r.num_images for r in fit)
        self.degrees = parallel_degrees(perf.model, self.cluster.gpus_per_node, settings.max_tp)
        self._cache: dict[tuple, float] = {}

    # ------------------------------------------------------------ feasibility
    def configs(self) -> list[tuple[int, int]]:
        """The (TP, PP) of `self.degrees` whose weights and one max_model_len sequence of KV fit a device."""
        m, c = self.perf.model, self.cluster
        out = []
        for tp, pp in self.degrees.configs:  # each fits in one node, so in the cluster
            if self.perf.weight_bytes_per_device(tp, pp) > c.usable_memory_bytes:
                self.progress(f"  TP{tp} PP{pp}: weights do not fit a device")
                continue
            if self.perf.kv_capacity_tokens(tp, pp) // pp < self.s.max_model_len:
                self.progress(
                    f"  TP{tp} PP{pp}: KV left after the weights holds no {self.s.max_model_len}-token sequence"
                )
                continue
            out.append((tp, pp))
        if not out:
            need = m.weight_bytes / 1e9
            raise PlanningError(
                f"model {m.name} ({need:.1f} GB of weights + KV for {self.s.max_model_len} tokens) fits on no "
                f"(TP, PP) configuration of cluster {c.name} ({c.num_gpus} × {c.usable_memory_bytes / 1e9:.1f} GB usable; "
                f"{self.degrees.describe()})"
            )
        return out

    # ------------------------------------------------------------ simulation configs
    def simulated_pool(self, role: Role, tp: int, pp: int, instances: int, intra: bool = True) -> SimulatedPool:
        return SimulatedPool(
            instances,
            self.perf.instance(tp, pp, intra),
            self.perf.kv_capacity_tokens(tp, pp),
            self.s.token_budget,
            self.s.max_batch,
        )

    def transfer(self, low_affinity: bool) -> TransferModel:
        return self.perf.transfer(intra_node=low_affinity)

    def sim_config(self, pools: tuple[PoolPlan, ...], mode: Mode, low_affinity: bool, slo: Slo) -> SimConfig:
        by = {p.role: p for p in pools if p.instances}
        intra = self.cluster.num_nodes == 1

        def cfg(role):
            p = by.get(role)
            return None if p is None else self.simulated_pool(role, p.tp, p.pp, p.instances, intra or low_affinity)

        return SimConfig(
            mode=mode,
            slo=slo,
            prefill=cfg(Role.PREFILL),
            decode=cfg(Role.DECODE),
            encode=cfg(Role.ENCODE),
            colocated=cfg(Role.COLOCATED),
            transfer=self.transfer(low_affinity),
            kv_bytes_per_token=self.perf.model.kv_bytes_per_token,
            block_size=self.s.block_size,
        )

    def window(self, reqs: tuple[Request, ...], rate: float) -> tuple[Request, ...]:
        """The sample rescaled to `rate`, repeated back to back until it spans min_window_slos × TTFT SLO.

        A short burst would drain within the SLO however overloaded the pool is, so the simulated
        span must be long against the SLO for an overload to show (capped at max_window requests).
        """
        base = rescale_rate(reqs, rate)
        span = base[-1].arrival_s + 1.0 / rate
        want = self.s.min_window_slos * min(self.s.slo.ttft_s, 1e6)
        if span >= want:
            return base
        copies = min(math.ceil(want / span), max(1, self.s.max_window // len(base)))
        return tuple(replace(r, arrival_s=r.arrival_s + k * span) for k in range(copies) for r in base)

    def attain(self, cfg: SimConfig, reqs: tuple[Request, ...], rate: float, early: bool = True) -> SimResult:
        return simulate(cfg, self.window(reqs, rate), self.s.target_attainment if early else None)

    def bisect_goodput(self, cfg: SimConfig, reqs: tuple[Request, ...], guess: float, precision: float = 0.04) -> float:
        """Highest rate with attainment >= target (0 if even guess/1024 fails)."""
        ok = lambda r: self.attain(cfg, reqs, r).attainment >= self.s.target_attainment
        lo, hi = 0.0, guess
        if ok(guess):
            lo = guess
            for _ in range(12):
                hi = lo * 2
                if not ok(hi):
                    break
                lo = hi
            else:
                return lo
        else:
            for _ in range(10):
                if ok(hi / 2):
                    lo = hi / 2
                    break
                hi /= 2
            else:
                return 0.0
        while (hi - lo) > precision * lo:
            mid = (lo + hi) / 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def guess_rate(self, role: Role, tp: int, pp: int) -> float:
        st = stats(self.fit)
        lat = self.perf.instance(tp, pp)
        p, o = st.mean_prompt_len, st.mean_output_len
        prefill_rate = pp / lat.prefill.seconds(p, p * p)
        batch = max(1.0, min(self.s.max_batch * pp, self.perf.kv_capacity_tokens(tp, pp) / (p + o)))
        decode_rate = batch / (max(o - 1, 1) * lat.decode.seconds(int(batch / pp) or 1, batch / pp * (p + o / 2)))
        return {Role.PREFILL: prefill_rate, Role.DECODE: decode_rate}.get(role, min(prefill_rate, decode_rate))

    def phase_goodput(self, role: Role, tp: int, pp: int, intra: bool) -> float:
        key = (role, tp, pp, intra)
        if key not in self._cache:
            slo = self.s.slo
            # Decode keeps the TTFT check: its admission wait is part of TTFT and is where overload shows.
            phase_slo = {Role.PREFILL: Slo(slo.ttft_s, math.inf)}.get(role, slo)
            mode = Mode.COLOCATED if role is Role.COLOCATED else Mode.DISAGGREGATED
            pool = self.simulated_pool(role, tp, pp, 1, intra)
            cfg = SimConfig(
                mode=mode,
                slo=phase_slo,
                transfer=self.transfer(intra),
                kv_bytes_per_token=self.perf.model.kv_bytes_per_token,
                block_size=self.s.block_size,
                **{role.value: pool},
            )
            self._cache[key] = self.bisect_goodput(cfg, self.fit, self.guess_rate(role, tp, pp))
        return self._cache[key]

    def rank_phase(self, role: Role, configs: list[tuple[int, int]], intra: bool) -> list[PhaseCandidate]:
        out = []
        for tp, pp in configs:
            g = self.phase_goodput(role, tp, pp, intra)
            self.progress(f"  {role.value:9s} TP{tp} PP{pp}: goodput {g:8.3f} req/s ({g / (tp * pp):.3f}/GPU)")
            if g > 0:
                out.append(PhaseCandidate(role, tp, pp, g))
        return sorted(out, key=lambda c: -c.per_gpu)

    # ------------------------------------------------------------ packing
    def pack(self, pools: tuple[PoolPlan, ...], low_affinity: bool) -> tuple[tuple[str, ...], ...] | None:
        """First-fit-decreasing of stage groups (tp devices, one node each) into nodes; None if it overflows.

        Low affinity: prefill and decode instances are paired stage by stage on the same node.
        """
        c = self.cluster
        free = [c.gpus_per_node] * c.num_nodes
        nodes: list[list[str]] = [[] for _ in range(c.num_nodes)]
        groups: list[tuple[int, list[str]]] = []
        if low_affinity:
            pre, dec = (next((p for p in pools if p.role is r), None) for r in (Role.PREFILL, Role.DECODE))
            n_pairs = min(pre.instances, dec.instances) if pre and dec else 0
            for k in range(n_pairs):
                for s in range(pre.pp):
                    groups.append((pre.tp + dec.tp, [f"prefill#{k}/s{s}(tp{pre.tp})", f"decode#{k}/s{s}(tp{dec.tp})"]))
            rest = [replace(p, instances=p.instances - n_pairs) for p in (pre, dec) if p]
            rest += [p for p in pools if p.role not in (Role.PREFILL, Role.DECODE)]
            start = n_pairs
        else:
            rest, start = list(pools), 0
        for p in rest:
            for k in range(p.instances):
                for s in range(p.pp):
                    groups.append((p.tp, [f"{p.role.value}#{start + k}/s{s}(tp{p.tp})"]))
        for size, names in sorted(groups, key=lambda g: -g[0]):
            n = next((j for j in range(c.num_nodes) if free[j] >= size), None)
            if n is None:
                return None
            free[n] -= size
            nodes[n].extend(names)
        return tuple(tuple(x) for x in nodes)

    # ------------------------------------------------------------ assembly
    def encode_pool(self, rate: float) -> tuple[PoolPlan, ...]:
        if not self.images:
            return ()
        imgs = sum(r.num_images for r in self.fit) / len(self.fit)
        per = self.perf.instance(1, 1).encode
        n = max(1, math.ceil(rate * (per.a + per.seconds(imgs)) / 0.8))
        return (PoolPlan(Role.ENCODE, 1, 1, n),)

    def replicate(
        self, units: list[tuple[PoolPlan, float]], low_affinity: bool
    ) -> tuple[tuple[PoolPlan, ...], float] | None:
        """Instance counts for the target rate (or the largest rate the cluster holds) given per-instance goodputs."""
        G = self.cluster.num_gpus
        if self.s.rate is not None:
            pools = tuple(replace(p, instances=max(1, math.ceil(self.s.rate / g))) for p, g in units)
            pools += self.encode_pool(self.s.rate)
            return (pools, self.s.rate) if self.pack(pools, low_affinity) else None
        best = None
        # Grow the pool that limits the rate, one instance at a time, while the cluster holds it.
        counts = [1] * len(units)
        while True:
            rate = min(n * g for n, (_, g) in zip(counts, units))
            pools = tuple(replace(p, instances=n) for n, (p, _) in zip(counts, units)) + self.encode_pool(rate)
            if sum(p.gpus for p in pools) > G or not self.pack(pools, low_affinity):
                break
            best = (pools, rate)
            k = min(range(len(units)), key=lambda j: counts[j] * units[j][1])
            counts[k] += 1
        return best

    def verify(self, pools: tuple[PoolPlan, ...], mode: Mode, low_affinity: bool, rate: float) -> Plan | None:
        """Simulate on held-out requests at `rate`, adding instances to the short pool until it meets."""
        for _ in range(self.s.max_added_instances + 1):
            cfg = self.sim_config(pools, mode, low_affinity, self.s.slo)
            res = self.attain(cfg, self.held, rate, early=False)
            if res.attainment >= self.s.target_attainment:
                break
            role = (
                Role.COLOCATED
                if mode is Mode.COLOCATED
                else (Role.PREFILL if res.ttft_attainment < res.tpot_attainment else Role.DECODE)
            )
            grown = tuple(replace(p, instances=p.instances + (p.role is role)) for p in pools)
            if self.pack(grown, low_affinity) is None:
                if self.s.rate is not None:
                    return None
                rate *= 0.9  # no target rate: the cluster is full, so back off the rate instead
                continue
            self.progress(
                f"  verify at {rate:.2f} req/s: attainment {res.attainment:.1%}, adding a {role.value} instance"
            )
            pools = grown
        else:
            return None
        guess = max(rate, 1e-6)
        goodput = self.bisect_goodput(cfg, self.held, guess)
        return Plan(
            pools,
            mode,
            low_affinity,
            rate,
            res.attainment,
            res.ttft_attainment,
            res.tpot_attainment,
            goodput,
            self.pack(pools, low_affinity) or (),
        )

    # ------------------------------------------------------------ top level
    def run(self) -> SearchResult:
        s, c = self.s, self.cluster
        self.progress(f"parallelism: {self.degrees.describe()}")
        configs = self.configs()
        self.progress(
            f"feasible (TP, PP): {', '.join(f'({t},{p})' for t, p in configs)}; "
            f"simulating {len(self.fit)} fit / {len(self.held)} held-out requests per run"
        )
        intra = c.num_nodes == 1 or s.low_affinity
        self.progress("prefill candidates:")
        pre = self.rank_phase(Role.PREFILL, degrees_for(Role.PREFILL, configs, c), intra)
        self.progress("decode candidates:")
        dec = self.rank_phase(Role.DECODE, degrees_for(Role.DECODE, configs, c), intra)
        self.progress("colocated candidates:")
        col = self.rank_phase(Role.COLOCATED, configs, intra)
        if not pre and not dec and not col:
            raise PlanningError(self._slo_message(configs))
        combos: list[tuple[float, tuple[PoolPlan, ...], float]] = []
        for p, d in self.pairs(pre, dec):
            rep = self.replicate(
                [(PoolPlan(Role.PREFILL, p.tp, p.pp, 1), p.goodput), (PoolPlan(Role.DECODE, d.tp, d.pp, 1), d.goodput)],
                s.low_affinity,
            )
            if rep:
                pools, rate = rep
                combos.append((rate / sum(x.gpus for x in pools), pools, rate))
        combos.sort(key=lambda x: -x[0])
        plans: list[Plan] = []
        for est, pools, rate in combos[: 1 + s.runners_up]:
            self.progress(
                f"verifying disaggregated {', '.join(f'{p.role.value} {p.instances}×(TP{p.tp},PP{p.pp})' for p in pools)} "
                f"at {rate:.2f} req/s (estimate {est:.3f} req/s/GPU)"
            )
            plan = self.verify(pools, Mode.DISAGGREGATED, s.low_affinity, rate)
            if plan:
                plans.append(plan)
        colocated = None
        for cc in col[:2]:
            rep = self.replicate([(PoolPlan(Role.COLOCATED, cc.tp, cc.pp, 1), cc.goodput)], False)
            if not rep:
                continue
            pools, rate = rep
            self.progress(f"verifying colocated {pools[0].instances}×(TP{cc.tp},PP{cc.pp}) at {rate:.2f} req/s")
            plan = self.verify(pools, Mode.COLOCATED, False, rate)
            if plan:
                plans.append(plan)
                if colocated is None or plan.goodput_per_gpu > colocated.goodput_per_gpu:
                    colocated = plan
        plans = [p for p in plans if p.goodput > 0]
        if not plans:
            if s.rate is not None:
                best = max((c.goodput for c in pre + dec + col), default=0.0)
                raise PlanningError(
                    f"no placement on cluster {c.name} ({c.num_gpus} GPUs) serves {s.rate:g} req/s within "
                    f"the SLOs (best single instance: {best:.3g} req/s); lower --rate or add GPUs"
                )
            raise PlanningError(self._slo_message(configs))
        # Ties (e.g. both prefill-bound) go to fewer devices, then fewer workers.
        plans.sort(key=lambda p: (-round(p.goodput_per_gpu, 9), p.num_gpus, sum(x.instances for x in p.pools)))
        return SearchResult(tuple(plans), colocated, tuple(pre + dec + col), self.degrees)

    def pairs(
        self, pre: list[PhaseCandidate], dec: list[PhaseCandidate]
    ) -> list[tuple[PhaseCandidate, PhaseCandidate]]:
        """Prefill × decode combinations to assemble: the top 3 × top 3 by goodput per GPU.

        Algorithm 2 needs a prefill and a decode instance on one node (tp_p + tp_d <= GPUs per node)
        and, were PP > 1 planned, equal PP degrees, so it takes the top 2 × top 2 within each PP degree.
        """
        if not self.s.low_affinity:
            return [(p, d) for p in pre[:3] for d in dec[:3]]
        out = []
        for pp in sorted({c.pp for c in pre}):
            ps = [c for c in pre if c.pp == pp][:2]
            ds = [c for c in dec if c.pp == pp][:2]
            out += [(p, d) for p in ps for d in ds if p.tp + d.tp <= self.cluster.gpus_per_node]
        return out

    def _slo_message(self, configs: list[tuple[int, int]]) -> str:
        st = stats(self.fit)
        l = st.mean_prompt_len
        best_prefill = min(self.perf.instance(tp, pp).prefill.seconds(l, l * l) for tp, pp in configs)
        best_step = min(self.perf.instance(tp, pp).decode.seconds(1, l) for tp, pp in configs)
        return (
            f"no configuration meets the SLOs (TTFT {self.s.slo.ttft_s:g} s, TPOT {self.s.slo.tpot_s:g} s) for 90% of "
            f"requests even at low load: the fastest prefill of a mean prompt ({l:.0f} tokens) takes {best_prefill:.3g} s "
            f"and the fastest single decode step {best_step:.3g} s"
        )

    def band(self, plan: Plan, slices: list[tuple[Request, ...]]) -> tuple[float, float, float]:
        """(p10, median, p90) of the plan's goodput over `slices` (trace.slices): how much the
        prediction moves with the part of the trace it rests on."""
        cfg = self.sim_config(plan.pools, plan.mode, plan.low_affinity, self.s.slo)
        goodputs = [self.bisect_goodput(cfg, s, max(plan.goodput, 1e-6)) for s in slices]
        p10, p50, p90 = np.percentile(goodputs, [10, 50, 90])
        return float(p10), float(p50), float(p90)

    def with_bands(self, result: SearchResult, slices: list[tuple[Request, ...]]) -> SearchResult:
        """Every plan with its band, ranked by the band's lower bound (p10) per device: the pick is
        the plan whose goodput per device holds best across the trace, not on one slice. Ties go to
        fewer devices, then fewer workers."""
        banded = []
        for i, plan in enumerate(result.plans):
            self.progress(
                f"band {i + 1}/{len(result.plans)}: {plan.mode.value} {plan.describe()}, {len(slices)} slices"
            )
            banded.append(replace(plan, band=self.band(plan, slices)))
        colocated = next((b for p, b in zip(result.plans, banded) if p is result.colocated), None)
        banded.sort(key=lambda p: (-round(p.lower_per_gpu, 9), p.num_gpus, sum(x.instances for x in p.pools)))
        return replace(result, plans=tuple(banded), colocated=colocated)

    def curve(self, plan: Plan, rates: list[float]) -> list[float]:
        """Held-out SLO attainment of `plan` at each rate (full runs, no early stop)."""
        cfg = self.sim_config(plan.pools, plan.mode, plan.low_affinity, self.s.slo)
        return [self.attain(cfg, self.held, r, early=False).attainment for r in rates]


def plan_placement(
    perf: PerfModel,
    fit: tuple[Request, ...],
    held_out: tuple[Request, ...],
    settings: SearchSettings,
    progress: Callable[[str], None] = lambda s: None,
) -> SearchResult:
    """Run the whole search; raises PlanningError for infeasible inputs."""
    return Searcher(perf, fit, held_out, settings, progress).run()
