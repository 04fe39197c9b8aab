"""Fair sharing of the cluster's decode slots among tenants (the principals of cluster/auth.py).

Every request holds one decode slot from the moment the router dispatches it (KV reservation,
prefill) until it ends; the cluster has `capacity()` slots (each decode or colocated worker runs
at most `engine.max_num_seqs` sequences). While slots are free, a request takes one at once. When
none is, requests wait here, per tenant in arrival order, and each freed slot goes to the waiting
tenant that holds the fewest slots (ties: the one whose request has waited longest):

    acquire(tenant) ── a slot free and nobody waiting ──▶ held
          │
          └── wait (bounded by the request's deadline) ── a slot frees, this tenant holds the
                                                         fewest among the waiting ──▶ held
    release(tenant) ──▶ the slot goes to the next waiter (as above), or back to the pool

So a client that floods the cluster keeps the slots it already holds, but every slot freed while
others wait goes to the others first: a light client waits at most for one slot to free, never
behind a heavy client's backlog. Slots are not preempted. Invariant: sum(held) <= capacity(),
except when capacity() shrinks (a decode worker died or switched role): then nothing is granted
until enough slots are released.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from collections.abc import Callable

TICK_S = 0.5   # waiters re-check at least this often (capacity can grow: a worker restarted or switched in)


class FairShare:
    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self.held: Counter[str] = Counter()
        self._waiting: dict[str, deque[tuple[int, asyncio.Future]]] = {}
        self._order = itertools.count()

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
        if capacity <= 0 or (not self._waiting and self.in_use < capacity):
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
        except BaseException:                  # cancelled: give back a slot granted meanwhile
            if fut.done() and not fut.cancelled():
                self.release(tenant)
            else:
                fut.cancel()
                self._forget(tenant, fut)
            raise
        if not fut.done():                     # timed out
            fut.cancel()
            self._forget(tenant, fut)
            return False
        return True

    def release(self, tenant: str) -> None:
        self.held[tenant] -= 1
        if self.held[tenant] <= 0:
            del self.held[tenant]
        self._grant()

    def _grant(self) -> None:
        capacity = self._capacity()
        while self._waiting and (self.in_use < capacity or capacity <= 0):
            tenant = min(self._waiting, key=lambda t: (self.held[t], self._waiting[t][0][0]))
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
