"""FairShare: decode slots are taken at once while a tenant is below its share; while several
tenants are active each holds at most an equal share, and freed slots go to the waiting tenant
holding the fewest; waits are bounded and cancellable without leaking slots."""

from __future__ import annotations

import asyncio

from cluster.fair_share import FairShare
from engine.worker_api import TENANT_ACTIVE_S as ACTIVE_S


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_a_flood_gets_its_share_and_freed_slots_go_to_the_lightest_tenant():
    async def scenario():
        now = [0.0]
        share = FairShare(lambda: 6, clock=lambda: now[0])
        for _ in range(6):  # alone, a tenant may use the whole cluster
            assert await share.acquire("flood", 1.0)
        order = []

        async def wait(tenant):
            assert await share.acquire(tenant, 10.0)
            order.append(tenant)

        waiters = [asyncio.ensure_future(wait(t)) for t in ("flood", "alice", "bob")]
        await asyncio.sleep(0.05)
        assert share.waiting == 3 and share.share() == 2  # three tenants active: 2 slots each
        for _ in range(2):  # two of flood's requests end: its slots go to the others
            share.release("flood")
            await asyncio.sleep(0.01)
        assert order == ["alice", "bob"]
        for _ in range(2):  # flood, down to its share, gets nothing back
            share.release("flood")
            await asyncio.sleep(0.01)
        assert order == ["alice", "bob"]
        share.release("flood")  # below its share: its waiter gets a slot
        await asyncio.sleep(0.01)
        assert order == ["alice", "bob", "flood"] and dict(share.held) == {"flood": 2, "alice": 1, "bob": 1}
        # With free slots, alice and bob take new ones at once; flood stays at its share.
        assert await share.acquire("alice", 0.1) and not await share.acquire("flood", 0.1)
        share.release("alice")
        share.release("alice")
        share.release("bob")  # they go quiet: after ACTIVE_S flood may use it all again
        now[0] += ACTIVE_S + 1
        assert share.share() == 6 and await share.acquire("flood", 1.0)
        await asyncio.gather(*waiters)

    run(scenario())


def test_timeouts_and_cancellation_leave_nothing_held():
    async def scenario():
        share = FairShare(lambda: 1)
        assert await share.acquire("a", 1.0)
        assert not await share.acquire("b", 0.1)  # timed out: not held, not queued
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
        assert await share.acquire("a", 0.1)  # no live worker: the router fails it itself
        share.release("a")
        cap[0] = 1
        assert await share.acquire("a", 0.1)
        waiter = asyncio.ensure_future(share.acquire("a", 5.0))
        await asyncio.sleep(0.05)
        cap[0] = 2  # a decode worker came back
        assert await waiter and share.in_use == 2

    run(scenario())
