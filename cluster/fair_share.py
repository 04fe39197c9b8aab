"""Fair sharing of the cluster's decode slots among tenants (the principals of cluster/auth.py).

Every request holds one decode slot from the moment the router dispatches it (KV reservation,
prefill) until it ends; the cluster has `capacity()` slots (each decode or colocated worker runs
at most `engine.max_num_seqs` sequences). A tenant is *active* while it holds or waits for a slot,
and for TENANT_ACTIVE_S after its last request ended (a client between two requests of a conversation).
While n tenants are active, each may hold at most its share, ceil(capacity / n):

    acquire(tenant) ── below its share, a slot free, nobody waiting ──▶ held
          │
          └── wait (bounded by the request's deadline) ── a slot frees (or shares change) and,
              among the waiting tenants below their share, this one holds the fewest (ties: the
              one waiting longest) ──▶ held
    release(tenant) ──▶ the slot goes to the next such waiter, or back to the pool

So a client that floods the cluster gets its share, not the cluster: the other active clients
keep free slots for their next requests and never queue behind the flood. With one tenant (no API
keys: everyone is "anonymous") the share is the whole capacity. Slots are not preempted: a tenant
above its share (it got there while alone) keeps what it holds and gets no more. Invariant:
sum(held) <= capacity(), except when capacity() shrinks (a decode worker died or switched role).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable

from engine.worker_api import TENANT_ACTIVE_S

TICK_S = 0.5  # waiters re-check at least this often (capacity and shares change)


class FairShare:
    def __init__(self, capacity: Callable[[], int], clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        self.held: Counter[str] = Counter()
        self._waiting: dict[str, deque[tuple[int, asyncio.Future]]] = {}
        self._order = itertools.count()
        self._last_end: dict[str, float] = {}  # tenant -> when its last slot was released

    def share(self) -> int:
        """Slots one active tenant may hold now."""
        now = self._clock()
        self._last_end = {t: at for t, at in self._last_end.items() if now - at < TENANT_ACTIVE_S}
        active = set(self.held) | set(self._waiting) | set(self._last_end)
        return math.ceil(self._capacity() / max(1, len(active)))

    @property
    def in_use(self) -> int:
        return sum(self.held.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def acquire(self, tenant: str, timeout_s: float) -> bool:
        """Take a slot for `tenant`; False if none came within timeout_s (nothing is then held).
        With no capacity at all (no live worker) it returns True at once: the router's own checks
        then fail the request with a clear error instead of letting it wait."""
        capacity = self._capacity()
        if capacity <= 0:
            self.held[tenant] += 1
            return True
        self.held[tenant] += 0  # active from now on (a Counter entry, not a slot)
        if not self._waiting and self.in_use < capacity and self.held[tenant] < self.share():
            self.held[tenant] += 1
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._waiting.setdefault(tenant, deque()).append((next(self._order), fut))
        end = loop.time() + timeout_s
        try:
            while not fut.done():
                self._grant()
                left = end - loop.time()
                if left <= 0:
                    break
                await asyncio.wait({fut}, timeout=min(TICK_S, left))
        except BaseException:  # cancelled: give back a slot granted meanwhile
            if fut.done() and not fut.cancelled():
                self.release(tenant)
            else:
                fut.cancel()
                self._forget(tenant, fut)
                self._idle(tenant)
            raise
        if not fut.done():  # timed out
            fut.cancel()
            self._forget(tenant, fut)
            self._idle(tenant)
            return False
        return True

    def release(self, tenant: str) -> None:
        self.held[tenant] -= 1
        self._idle(tenant)
        self._grant()

    def _idle(self, tenant: str) -> None:
        """Forget a tenant's zero entry once it holds nothing, remembering when it was last active."""
        if self.held[tenant] <= 0:
            del self.held[tenant]
            self._last_end[tenant] = self._clock()

    def _grant(self) -> None:
        capacity = self._capacity()
        while self._waiting and (self.in_use < capacity or capacity <= 0):
            share = self.share()
            eligible = [t for t in self._waiting if self.held[t] < share or capacity <= 0]
            if not eligible:
                return
            tenant = min(eligible, key=lambda t: (self.held[t], self._waiting[t][0][0]))
            queue = self._waiting[tenant]
            _, fut = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if not fut.done():
                self.held[tenant] += 1
                fut.set_result(None)

    def _forget(self, tenant: str, fut: asyncio.Future) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            return
        for item in list(queue):
            if item[1] is fut:
                queue.remove(item)
        if not queue:
            del self._waiting[tenant]
