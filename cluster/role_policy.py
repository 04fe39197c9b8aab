"""The role policy: moves workers between the prefill and decode pools (and the encode and
prefill pools) as the load shifts.

Every `interval_s` it reads one snapshot of the cluster and the requests that ended since the
last switch:

    signals ── TTFT attainment (recent requests within the TTFT SLO), prefill queue per worker
            ── TPOT attainment (within the TPOT SLO), decode KV usage, decode sequences per worker
    pressure: prefill short  = TTFT attainment < target  or  prefill queue per worker >= queue_high
              decode short   = TPOT attainment < target  or  decode KV usage >= kv_high
    proposal: prefill short and decode not short, and the decode pool would keep its KV usage
              under kv_high with one worker less  ──▶ move the least-loaded decode worker to prefill
              (and the mirror image for decode short)

With `encode_prefill` (a vision-language deployment whose encode and prefill workers hold both
halves of the model), the encode pool joins in, through the prefill pool only:

    signal:   encode queue = image shards in flight per live encode worker
              encode short = encode queue >= encode_queue_high
    proposal: encode short and the prefill queue under queue_high ──▶ move a prefill worker to
              encode (checked first: TTFT includes the encode wait, so while images pile up
              at the encode pool TTFT misses do not count against prefill)
              prefill short, decode cannot give a worker (it is short too, or at its minimum),
              and the encode queue is under 1 per worker ──▶ move an encode worker to prefill
    Only workers that loaded both halves are moved (the router says which can).

Hysteresis, so it does not flap:
  - a proposal must repeat on `sustain` consecutive checks before it is carried out;
  - after any switch nothing moves for `cooldown_s`, and attainment only counts requests that
    arrived after the last switch (the ones before measured the old split);
  - attainment signals need `min_samples` requests; an idle cluster proposes nothing;
  - a pool never goes below `min_workers`.

`decide()` is pure (unit-tested); `RolePolicy` runs it against a router and calls
`router.set_worker_role`, which drains the worker, fences it with a new epoch and switches it
without reloading weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from cluster.router_api import ClusterStatus, RouterError
from engine.worker_api import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolePolicyOptions:
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    target: float = 0.9  # attainment below this is a shortage
    interval_s: float = 2.0
    sustain: int = 3  # consecutive identical proposals before a switch
    cooldown_s: float = 30.0  # after a switch, no other switch for this long
    window_s: float = 60.0  # requests that ended this recently count
    min_samples: int = 8  # requests needed for an attainment signal
    queue_high: float = 2.0  # prefill queue per worker that counts as a shortage
    kv_high: float = 0.8  # decode KV usage that counts as a shortage
    min_workers: int = 1  # per pool
    drain_timeout_s: float = 60.0
    encode_prefill: bool = False  # also move workers between the encode and prefill pools
    encode_queue_high: float = 2.0  # image shards in flight per encode worker that count as a shortage


@dataclass(frozen=True)
class Signals:
    n_prefill: int
    n_decode: int
    ttft_attainment: float | None  # None: fewer than min_samples requests
    tpot_attainment: float | None
    prefill_queue: float  # queued prompts per live prefill worker
    decode_kv_usage: float  # used / total KV blocks over live decode workers
    samples: int
    n_encode: int = 0
    encode_queue: float = 0.0  # image shards in flight per live encode worker

    def describe(self) -> str:
        def pct(v):
            return "n/a" if v is None else f"{100 * v:.0f}%"

        encode = f"; encode queue/worker {self.encode_queue:.1f}" if self.n_encode else ""
        return (
            f"TTFT ok {pct(self.ttft_attainment)}, TPOT ok {pct(self.tpot_attainment)} of {self.samples}; "
            f"prefill queue/worker {self.prefill_queue:.1f}; decode KV {100 * self.decode_kv_usage:.0f}%{encode}"
        )


@dataclass(frozen=True)
class Proposal:
    from_role: Role
    to_role: Role
    reason: str


def signals(status: ClusterStatus, recent, since: float, now: float, o: RolePolicyOptions) -> Signals:
    """recent: (end monotonic s, ttft s, tpot s, completion tokens, completed) of requests."""
    prefill = [w for w in status.workers if w.role is Role.PREFILL and w.alive]
    decode = [w for w in status.workers if w.role is Role.DECODE and w.alive]
    encode = [w for w in status.workers if w.role is Role.ENCODE and w.alive]
    window = [r for r in recent if r[0] >= max(since, now - o.window_s)]
    ttft_ok = tpot_ok = None
    if len(window) >= o.min_samples:
        ttft_ok = sum(1 for r in window if r[4] and r[1] <= o.ttft_slo_s) / len(window)
        timed = [r for r in window if r[3] > 1]
        tpot_ok = (
            sum(1 for r in timed if r[4] and r[2] <= o.tpot_slo_s) / len(timed) if len(timed) >= o.min_samples else None
        )
    total = sum(w.kv_blocks_total for w in decode)
    used = sum(w.kv_blocks_used for w in decode)
    return Signals(
        len(prefill),
        len(decode),
        ttft_ok,
        tpot_ok,
        sum(w.queue_length for w in prefill) / max(1, len(prefill)),
        used / total if total else 0.0,
        len(window),
        len(encode),
        sum(w.queue_length for w in encode) / max(1, len(encode)),
    )


def decide(s: Signals, o: RolePolicyOptions) -> Proposal | None:
    prefill_short = (s.ttft_attainment is not None and s.ttft_attainment < o.target) or s.prefill_queue >= o.queue_high
    decode_short = (s.tpot_attainment is not None and s.tpot_attainment < o.target) or s.decode_kv_usage >= o.kv_high
    encode_short = o.encode_prefill and s.n_encode > 0 and s.encode_queue >= o.encode_queue_high
    # TTFT includes the wait for image encoding: while images pile up at the encode pool, TTFT
    # misses say "encode", so only the prefill queue speaks for prefill then.
    if encode_short and s.prefill_queue < o.queue_high and s.n_prefill > o.min_workers:
        return Proposal(Role.PREFILL, Role.ENCODE, f"encode short: {s.describe()}")
    if prefill_short and not decode_short and s.n_decode > o.min_workers:
        # The decode workers left must hold what all of them hold now.
        if s.decode_kv_usage * s.n_decode / (s.n_decode - 1) < o.kv_high:
            return Proposal(Role.DECODE, Role.PREFILL, f"prefill short: {s.describe()}")
    if decode_short and not prefill_short and s.n_prefill > o.min_workers:
        return Proposal(Role.PREFILL, Role.DECODE, f"decode short: {s.describe()}")
    if not o.encode_prefill or not s.n_encode:
        return None
    if prefill_short and not encode_short and s.encode_queue < 1.0 and s.n_encode > o.min_workers:
        return Proposal(Role.ENCODE, Role.PREFILL, f"prefill short, encode idle: {s.describe()}")
    return None


class RolePolicy:
    def __init__(self, router, options: RolePolicyOptions = RolePolicyOptions()) -> None:
        self.router = router
        self.options = options
        self.since = time.monotonic()  # attainment counts requests that end after this
        self.last_switch: float | None = None  # the cooldown runs from the last switch (none at start)
        self._pending: tuple[Role, Role] | None = None
        self._streak = 0
        self._task: asyncio.Task | None = None
        self.last_signals: Signals | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval_s)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("role policy check failed")

    async def check_once(self) -> Proposal | None:
        """One evaluation; returns the proposal it carried out, if any."""
        o = self.options
        now = time.monotonic()
        if self.last_switch is not None and now - self.last_switch < o.cooldown_s:
            return None
        status = await self.router.cluster_status()
        s = signals(status, list(self.router.recent), self.since, now, o)
        self.last_signals = s
        p = decide(s, o)
        key = (p.from_role, p.to_role) if p else None
        self._streak = self._streak + 1 if key is not None and key == self._pending else (1 if key else 0)
        self._pending = key
        if p is None or self._streak < o.sustain:
            return None
        pool = getattr(self.router, p.from_role.value)  # router.encode / .prefill / .decode
        candidates = sorted((w for w in pool if w.serving), key=lambda w: w.inflight)
        if len(candidates) <= o.min_workers:
            return None
        if Role.ENCODE in (p.from_role, p.to_role):  # only workers that hold both halves
            able = [w for w in candidates if p.to_role in await self.router.worker_roles(w)]
            if not able:
                return None
            candidates = able
        worker = candidates[0]
        log.warning("role policy: moving %s to %s (%s)", worker.worker_id, p.to_role.value, p.reason)
        try:
            await self.router.set_worker_role(worker.worker_id, p.to_role, p.reason, o.drain_timeout_s)
        except RouterError as exc:
            log.warning("role policy: switch of %s not done: %s", worker.worker_id, exc.message)
            return None
        finally:
            self._streak, self._pending = 0, None
            self.last_switch = self.since = time.monotonic()
        return p
