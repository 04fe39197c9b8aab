"""Discrete-event simulator of encode, prefill and decode pools (or one colocated pool).

A request's path, disaggregated::

    ARRIVE ─(images?)→ encode queue ─→ prefill queue ─→ decode admission queue ─→ KV transfer ─→ decode batch ─→ DONE
                 FCFS, one call/request   FCFS, token-budget batch   waits for free KV blocks    bytes/bw    continuous batching

and colocated (Sarathi-Serve): ARRIVE → instance queue → admitted (KV reserved) → prompt processed
in chunks inside iterations whose token budget goes to running decodes first → decode → DONE.

Rules (all instances of a pool are identical; times in seconds, lengths in tokens):
- Dispatch: every pool sends a new request to the instance with the fewest requests queued or in
  service (shortest queue), ties to the lowest index.
- Prefill batching: FCFS; a batch takes queued prompts while Σl <= token_budget (always >= 1).
  A PP instance starts its next batch after latency/pp (one stage) — pipelined — and the batch's
  first tokens appear after the full latency.
- Decode: a PP instance is pp independent micro-batch lanes, each with KV capacity/pp and the
  full-depth step latency. A request is admitted to a lane when ceil((prompt+output)/block) blocks
  are free (reserved for its whole life, so no preemption) and the lane runs < max_batch sequences;
  otherwise it waits FCFS. After admission its KV is transferred (transfer model, links are not
  contended); the first token counts as delivered when the transfer lands (TTFT includes it). Each
  step emits one token per running sequence; a sequence with context c adds c to Σcontext.
- TPOT = (finish − first token) / (output_len − 1), 0 for one-token outputs. A request attains the
  SLO when TTFT <= ttft_s and TPOT <= tpot_s.
- A pool left out (prefill=None or decode=None) is skipped: decode-only runs admit requests at
  arrival (set ttft_s=inf to judge TPOT only); prefill-only runs finish at first token (+ transfer).
- Early stop (for the goodput search): with min_attainment set, the run stops as soon as more than
  (1 − min_attainment)·N requests have missed; the result then has complete=False and an
  attainment that is an upper bound below min_attainment.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from dataclasses import dataclass

from engine.worker_api import Mode
from placement.latency_model import InstanceLatency, TransferModel
from placement.trace import Request


class _Ev(enum.IntEnum):
    ARRIVE = 0
    ENCODE_DONE = 1
    PREFILL_DONE = 2
    PREFILL_FREE = 3
    TRANSFER_DONE = 4
    STEP_DONE = 5


@dataclass(frozen=True)
class Slo:
    """Latency targets in seconds; math.inf disables a check."""

    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class SimulatedPool:
    """One simulated pool: `instances` identical instances; kv_capacity_tokens per instance (all its
    devices together). Not a deploy pool (`cluster.config.PoolConfig`): only what the simulator needs."""

    instances: int
    latency: InstanceLatency
    kv_capacity_tokens: int = 1 << 40
    token_budget: int = 8192
    max_batch: int = 256


@dataclass(frozen=True)
class SimConfig:
    mode: Mode
    slo: Slo
    prefill: SimulatedPool | None = None
    decode: SimulatedPool | None = None
    encode: SimulatedPool | None = None
    colocated: SimulatedPool | None = None
    transfer: TransferModel = TransferModel(0.0, math.inf)
    kv_bytes_per_token: int = 0
    block_size: int = 16


@dataclass(frozen=True)
class RequestResult:
    """Per-request latencies in seconds (math.inf: never served, e.g. larger than any KV pool)."""

    ttft_s: float
    tpot_s: float
    e2e_s: float


@dataclass(frozen=True)
class SimResult:
    results: tuple[RequestResult, ...]
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    complete: bool


class _Lane:
    """One decode micro-batch lane (or one colocated instance lane): KV blocks + running batch."""

    __slots__ = (
        "free_blocks",
        "capacity_blocks",
        "waiting",
        "joining",
        "running",
        "finish_heap",
        "step",
        "sum_ctx",
        "busy",
        "prefilling",
        "load",
    )

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = capacity_blocks
        self.free_blocks = capacity_blocks
        self.waiting: deque[int] = deque()  # request ids waiting for admission (FCFS)
        self.joining: list[int] = []  # transferred, join the batch at the next step start
        self.running = 0  # sequences in the decode batch
        self.finish_heap: list[tuple[int, int]] = []  # (step index at which it finishes, request id)
        self.step = 0  # completed steps
        self.sum_ctx = 0  # Σ context tokens of running sequences
        self.busy = False
        self.prefilling: deque[list[int]] = deque()  # colocated: [request id, tokens done]
        self.load = 0  # dispatch metric: requests assigned and not done


class Simulator:
    """Replays one request list through one SimConfig. Use `simulate(config, requests)`."""

    def __init__(self, cfg: SimConfig, requests: tuple[Request, ...], min_attainment: float | None):
        self.cfg, self.reqs = cfg, requests
        n = len(requests)
        self.first = [math.nan] * n
        self.finish = [math.nan] * n
        self.heap: list = []
        self.seq = 0
        self.misses = 0
        self.allowed_misses = n if min_attainment is None else math.floor((1 - min_attainment) * n)
        self.aborted = False
        self.encode_q = [deque() for _ in range(cfg.encode.instances)] if cfg.encode else []
        self.encode_busy = [False] * len(self.encode_q)
        if cfg.prefill:
            self.prefill_q = [deque() for _ in range(cfg.prefill.instances)]
            self.prefill_busy = [False] * cfg.prefill.instances
            self.prefill_load = [0] * cfg.prefill.instances
        pool = cfg.colocated if cfg.mode is Mode.COLOCATED else cfg.decode
        self.lanes: list[_Lane] = []
        if pool is not None:
            pp = pool.latency.pp
            blocks = (pool.kv_capacity_tokens // pp) // cfg.block_size
            self.lanes = [_Lane(blocks) for _ in range(pool.instances * pp)]
            self.lane_pool = pool

    # ------------------------------------------------------------ plumbing
    def push(self, t: float, kind: _Ev, a: int, b=None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def run(self) -> SimResult:
        for i, r in enumerate(self.reqs):
            self.push(r.arrival_s, _Ev.ARRIVE, i)
        handlers = {
            _Ev.ARRIVE: self.on_arrive,
            _Ev.ENCODE_DONE: self.on_encode_done,
            _Ev.PREFILL_DONE: self.on_prefill_done,
            _Ev.PREFILL_FREE: self.on_prefill_free,
            _Ev.TRANSFER_DONE: self.on_transfer_done,
            _Ev.STEP_DONE: self.on_step_done,
        }
        heap = self.heap
        while heap and not self.aborted:
            t, _, kind, a, b = heapq.heappop(heap)
            handlers[kind](t, a, b)
        return self.result()

    def miss(self) -> None:
        self.misses += 1
        if self.misses > self.allowed_misses:
            self.aborted = True

    def set_first(self, t: float, i: int) -> None:
        self.first[i] = t
        if t - self.reqs[i].arrival_s > self.cfg.slo.ttft_s:
            self.miss()

    def set_finish(self, t: float, i: int) -> None:
        self.finish[i] = t
        r = self.reqs[i]
        if (
            r.output_len > 1
            and (t - self.first[i]) / (r.output_len - 1) > self.cfg.slo.tpot_s
            and self.first[i] - r.arrival_s <= self.cfg.slo.ttft_s
        ):  # count each request once
            self.miss()

    @staticmethod
    def shortest(loads) -> int:
        return min(range(len(loads)), key=loads.__getitem__)

    # ------------------------------------------------------------ arrival and encode
    def on_arrive(self, t: float, i: int, _b) -> None:
        if self.reqs[i].num_images > 0 and self.encode_q:
            k = self.shortest([len(q) + self.encode_busy[j] for j, q in enumerate(self.encode_q)])
            self.encode_q[k].append(i)
            self.try_encode(t, k)
        else:
            self.to_prefill(t, i)

    def try_encode(self, t: float, k: int) -> None:
        if self.encode_busy[k] or not self.encode_q[k]:
            return
        i = self.encode_q[k].popleft()
        self.encode_busy[k] = True
        self.push(t + self.cfg.encode.latency.encode.seconds(self.reqs[i].num_images), _Ev.ENCODE_DONE, k, i)

    def on_encode_done(self, t: float, k: int, i: int) -> None:
        self.encode_busy[k] = False
        self.to_prefill(t, i)
        self.try_encode(t, k)

    # ------------------------------------------------------------ prefill
    def to_prefill(self, t: float, i: int) -> None:
        if self.cfg.mode is Mode.COLOCATED:
            self.to_lane(t, i)
        elif self.cfg.prefill is None:
            self.to_lane(t, i)
        else:
            k = self.shortest(self.prefill_load)
            self.prefill_q[k].append(i)
            self.prefill_load[k] += 1
            self.try_prefill(t, k)

    def try_prefill(self, t: float, k: int) -> None:
        q = self.prefill_q[k]
        if self.prefill_busy[k] or not q:
            return
        budget = self.cfg.prefill.token_budget
        batch, s1, s2 = [], 0, 0
        while q:
            l = self.reqs[q[0]].prompt_len
            if batch and s1 + l > budget:
                break
            batch.append(q.popleft())
            s1 += l
            s2 += l * l
        lat = self.cfg.prefill.latency
        dur = lat.prefill.seconds(s1, s2)
        self.prefill_busy[k] = True
        self.push(t + dur, _Ev.PREFILL_DONE, k, batch)
        self.push(t + dur / lat.pp, _Ev.PREFILL_FREE, k)

    def on_prefill_free(self, t: float, k: int, _b) -> None:
        self.prefill_busy[k] = False
        self.try_prefill(t, k)

    def on_prefill_done(self, t: float, k: int, batch: list[int]) -> None:
        self.prefill_load[k] -= len(batch)
        for i in batch:
            if self.cfg.decode is None:
                done = t + self.transfer_s(i)
                self.set_first(done, i)
                self.finish[i] = done
            else:
                self.to_lane(t, i)

    def transfer_s(self, i: int) -> float:
        return self.cfg.transfer.seconds(self.reqs[i].prompt_len * self.cfg.kv_bytes_per_token)

    # ------------------------------------------------------------ decode / colocated lanes
    def to_lane(self, t: float, i: int) -> None:
        lanes = self.lanes
        k = min(range(len(lanes)), key=lambda j: lanes[j].load)
        lane = lanes[k]
        lane.load += 1
        lane.waiting.append(i)
        if self.cfg.mode is Mode.COLOCATED:
            if not lane.busy:
                self.start_iteration(t, k)
        else:
            self.admit(t, k)

    def blocks(self, i: int) -> int:
        r = self.reqs[i]
        return -(-(r.prompt_len + r.output_len) // self.cfg.block_size)

    def admit_one(self, t: float, lane: _Lane) -> int | None:
        """Pop and reserve the head of the waiting queue if it fits; never-fitting heads fail."""
        while lane.waiting:
            i = lane.waiting[0]
            need = self.blocks(i)
            if need > lane.capacity_blocks:  # can never be served by this pool
                lane.waiting.popleft()
                lane.load -= 1
                self.first[i] = self.finish[i] = math.inf
                self.miss()
                continue
            active = lane.running + len(lane.joining) + len(lane.prefilling)
            if need > lane.free_blocks or active >= self.lane_pool.max_batch:
                return None
            lane.waiting.popleft()
            lane.free_blocks -= need
            return i
        return None

    def admit(self, t: float, k: int) -> None:
        lane = self.lanes[k]
        while (i := self.admit_one(t, lane)) is not None:
            lane.joining.append(-1)  # placeholder so max_batch counts in-flight transfers
            self.push(t + self.transfer_s(i), _Ev.TRANSFER_DONE, k, i)

    def on_transfer_done(self, t: float, k: int, i: int) -> None:
        lane = self.lanes[k]
        lane.joining.remove(-1)
        self.set_first(t, i)
        if self.reqs[i].output_len == 1:
            self.release(t, lane, i)
            self.admit(t, k)
            return
        lane.joining.append(i)
        if not lane.busy:
            self.start_step(t, k)

    def release(self, t: float, lane: _Lane, i: int) -> None:
        self.set_finish(t, i)
        lane.free_blocks += self.blocks(i)
        lane.load -= 1

    def join(self, lane: _Lane, i: int) -> None:
        """Sequence i enters the running batch with context prompt+1; it needs output_len-1 steps."""
        r = self.reqs[i]
        lane.running += 1
        lane.sum_ctx += r.prompt_len + 1
        heapq.heappush(lane.finish_heap, (lane.step + r.output_len - 1, i))

    def start_step(self, t: float, k: int) -> None:
        lane = self.lanes[k]
        joiners = [i for i in lane.joining if i >= 0]
        lane.joining = [i for i in lane.joining if i < 0]
        for i in joiners:
            self.join(lane, i)
        if lane.running == 0:
            lane.busy = False
            return
        lane.busy = True
        dur = self.lane_pool.latency.decode.seconds(lane.running, lane.sum_ctx)
        self.push(t + dur, _Ev.STEP_DONE, k)

    def finish_step(self, t: float, lane: _Lane) -> None:
        """Advance one step: every running sequence gained a token; retire those that are done."""
        lane.step += 1
        lane.sum_ctx += lane.running
        h = lane.finish_heap
        while h and h[0][0] <= lane.step:
            _, i = heapq.heappop(h)
            r = self.reqs[i]
            lane.running -= 1
            lane.sum_ctx -= r.prompt_len + r.output_len
            self.release(t, lane, i)

    def on_step_done(self, t: float, k: int, chunks) -> None:
        lane = self.lanes[k]
        if self.cfg.mode is Mode.COLOCATED:
            self.end_iteration(t, k, chunks)
            return
        self.finish_step(t, lane)
        self.admit(t, k)
        self.start_step(t, k)

    # ------------------------------------------------------------ colocated iterations
    def start_iteration(self, t: float, k: int) -> None:
        """Decode-first: running sequences take one token each, the rest of the budget goes to prompt chunks."""
        lane, pool = self.lanes[k], self.lane_pool
        for i in lane.joining:
            self.join(lane, i)
        lane.joining = []
        while (i := self.admit_one(t, lane)) is not None:
            lane.prefilling.append([i, 0])
        budget = pool.token_budget - lane.running
        chunks, s1, sq = [], 0, 0.0
        for entry in lane.prefilling:
            if budget <= 0:
                break
            i, done = entry
            take = min(budget, self.reqs[i].prompt_len - done)
            chunks.append((entry, take))
            budget -= take
            s1 += take
            sq += (done + take) ** 2 - done**2
        if lane.running == 0 and not chunks:
            lane.busy = False
            return
        lat = pool.latency
        fixed = max(lat.decode.a if lane.running else 0.0, lat.prefill.a if chunks else 0.0)
        dur = (
            fixed + lat.decode.b * lane.sum_ctx + lat.decode.c * lane.running + lat.prefill.b * s1 + lat.prefill.c * sq
        )
        lane.busy = True
        self.push(t + dur, _Ev.STEP_DONE, k, chunks)

    def end_iteration(self, t: float, k: int, chunks: list) -> None:
        """Decodes advance a token; prompts whose last chunk ran emit token 1 and join the batch next iteration."""
        lane = self.lanes[k]
        self.finish_step(t, lane)
        completed = False
        for entry, take in chunks:
            entry[1] += take
            i = entry[0]
            if entry[1] == self.reqs[i].prompt_len:
                completed = True
                self.set_first(t, i)
                if self.reqs[i].output_len == 1:
                    self.release(t, lane, i)
                else:
                    lane.joining.append(i)
        if completed:
            lane.prefilling = deque(e for e in lane.prefilling if e[1] < self.reqs[e[0]].prompt_len)
        self.start_iteration(t, k)

    def result(self) -> SimResult:
        slo = self.cfg.slo
        out, ok, ok_ttft, ok_tpot = [], 0, 0, 0
        for i, r in enumerate(self.reqs):
            f, e = self.first[i], self.finish[i]
            if math.isnan(f) or math.isnan(e):
                ttft = tpot = e2e = math.inf
            else:
                ttft = f - r.arrival_s
                tpot = (e - f) / (r.output_len - 1) if r.output_len > 1 else 0.0
                e2e = e - r.arrival_s
            out.append(RequestResult(ttft, tpot, e2e))
            a, b = ttft <= slo.ttft_s, tpot <= slo.tpot_s
            ok_ttft += a
            ok_tpot += b
            ok += a and b
        n = max(1, len(self.reqs))
        complete = not self.aborted
        att = ok / n if complete else min(ok / n, 1 - self.misses / n)
        return SimResult(tuple(out), att, ok_ttft / n, ok_tpot / n, complete)


def simulate(cfg: SimConfig, requests: tuple[Request, ...], min_attainment: float | None = None) -> SimResult:
    """Run the trace through the configured pools; see the module docstring for the rules."""
    return Simulator(cfg, requests, min_attainment).run()
