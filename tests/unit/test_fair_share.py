"""FairShare: decode slots are taken at once while free; when none is, each freed slot goes to
the waiting tenant holding the fewest; waits are bounded and cancellable without leaking slots."""

from __future__ import annotations

import asyncio

from cluster.fair_share import FairShare


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_free_slots_are_taken_at_once_and_freed_ones_go_to_the_lightest_tenant():
    async def scenario():
        cap = [3]
        share = FairShare(lambda: cap[0])
        for _ in range(3):
            assert await share.acquire("flood", 1.0)
        order = []

        async def wait(tenant):
            assert await share.acquire(tenant, 5.0)
            order.append(tenant)

        waiters = [asyncio.ensure_future(wait(t)) for t in ("flood", "flood", "alice", "bob")]
        await asyncio.sleep(0.05)
        assert share.waiting == 4 and order == []
        for _ in range(3):                  # three of flood's requests end
            share.release("flood")
            await asyncio.sleep(0.01)
        assert order == ["alice", "bob", "flood"]       # light tenants first, though flood asked first
        assert dict(share.held) == {"flood": 1, "alice": 1, "bob": 1}
        share.release("alice")
        await asyncio.gather(*waiters)
        assert order[-1] == "flood" and share.in_use == 3 and share.waiting == 0

    run(scenario())


def test_timeouts_and_cancellation_leave_nothing_held():
    async def scenario():
        share = FairShare(lambda: 1)
        assert await share.acquire("a", 1.0)
        assert not await share.acquire("b", 0.1)        # timed out: not held, not queued
        assert dict(share.held) == {"a": 1} and share.waiting == 0
        task = asyncio.ensure_future(share.acquire("c", 5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert share.waiting == 0 and dict(share.held) == {"a": 1}
        # Granted and cancelled in the same turn: the slot goes back.
        task = asyncio.ensure_future(share.acquire("d", 5.0))
        await asyncio.sleep(0.05)
        share.release("a")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert share.in_use == 0 and share.waiting == 0

    run(scenario())


def test_no_capacity_lets_requests_through_and_capacity_growth_wakes_waiters():
    async def scenario():
        cap = [0]
        share = FairShare(lambda: cap[0])
        assert await share.acquire("a", 0.1)            # no live worker: the router fails it itself
        share.release("a")
        cap[0] = 1
        assert await share.acquire("a", 0.1)
        waiter = asyncio.ensure_future(share.acquire("b", 5.0))
        await asyncio.sleep(0.05)
        cap[0] = 2                                      # a decode worker came back
        assert await waiter and share.in_use == 2

    run(scenario())
