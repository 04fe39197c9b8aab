"""Supervisor with fake actors: a dead worker is restarted, swapped into the router and polled;
failed starts back off and are capped; a health ping that sees death marks the worker dead."""

from __future__ import annotations

import asyncio


from cluster.pools import WorkerHandle
from cluster.router import ClusterRouter
from cluster.router_api import ModelInfo
from engine.worker_api import Role, WorkerInfo, WorkerReady
from cluster.supervisor import Supervisor, SupervisorOptions


class Dead(Exception):
    pass


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeActor:
    """What the supervisor and the router's poller call: ready() and poll()."""

    def __init__(self, name: str, node: str = "node-a", fail_ready: bool = False) -> None:
        self.name, self.node, self.fail_ready, self.dead, self.polls = name, node, fail_ready, False, 0
        self.ready = _Method(self._ready)
        self.poll = _Method(self._poll)

    role = Role.DECODE

    async def _ready(self):
        if self.dead or self.fail_ready:
            raise Dead(self.name)
        return WorkerReady(WorkerInfo(self.name, self.role, self.node, "host", 0), self.layout())

    def layout(self):
        return "layout"

    async def _poll(self, timeout_s, epoch=None):
        if self.dead:
            raise Dead(self.name)
        self.polls += 1
        await asyncio.sleep(0.01)
        return []


def make_router() -> ClusterRouter:
    info = ModelInfo("fake", 64, 10, (), "float32", False)
    prefill = [WorkerHandle("prefill-0", Role.PREFILL, FakeActor("p0"))]
    decode = [WorkerHandle("decode-0", Role.DECODE, FakeActor("d0"))]
    return ClusterRouter(
        mode="disaggregated",
        tokenizer=None,
        model_info=info,
        kv_capacity_tokens=64,
        prefill=prefill,
        decode=decode,
        max_inflight=4,
        default_timeout_s=5.0,
    )


FAST = SupervisorOptions(
    check_s=0.01, ping_timeout_s=0.5, ready_timeout_s=0.5, backoff_s=0.01, max_backoff_s=0.04, max_restarts=3
)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_dead_worker_is_restarted_and_swapped_in():
    async def scenario():
        router = make_router()
        spawned, killed = [], []

        def spawn(role, worker_id, epoch):
            spawned.append((role, worker_id, epoch))
            return FakeActor(f"{worker_id}-r{epoch}", node="node-b")

        sup = Supervisor(router, spawn, killed.append, options=FAST, is_death=lambda e: isinstance(e, Dead))
        old = router.decode[0]
        old.actor.dead = True
        router.mark_dead(old, Dead("killed"))
        sup.start()
        assert await sup.wait_all_alive(2.0)
        new = router.decode[0]
        await asyncio.sleep(0.05)  # the router polls the replacement
        await sup.stop()
        await router.shutdown()
        return old, new, spawned, killed, sup

    old, new, spawned, killed, sup = run(scenario())
    assert not old.alive and new is not old
    assert (new.worker_id, new.epoch, new.node_id, new.alive) == ("decode-0", 1, "node-b", True)
    assert spawned == [(Role.DECODE, "decode-0", 1)] and killed == [old.actor]  # killed before its replacement
    assert new.actor.polls > 0
    assert sup.restarts() == {"decode-0": 1} and sup.history[0].error is None


def test_worker_whose_loop_died_is_killed_and_replaced():
    """A worker that answers WorkerLoopDied (its step loop died; the process lives on) counts as
    dead with the default death test: marked dead, killed, replaced."""
    from engine.errors import WorkerLoopDied

    async def scenario():
        router = make_router()
        spawned, killed = [], []

        def spawn(role, worker_id, epoch):
            spawned.append((role, worker_id, epoch))
            return FakeActor(f"{worker_id}-r{epoch}")

        sup = Supervisor(router, spawn, killed.append, options=FAST)
        old = router.decode[0]

        async def loop_died(*args, **kwargs):
            raise WorkerLoopDied("the step loop of decode worker decode-0 died")

        old.actor.ready.fn = old.actor.poll.fn = loop_died
        sup.start()
        for _ in range(200):
            if router.decode[0] is not old and router.decode[0].alive:
                break
            await asyncio.sleep(0.01)
        await sup.stop()
        await router.shutdown()
        return old, spawned, killed

    old, spawned, killed = run(scenario())
    assert not old.alive and spawned == [(Role.DECODE, "decode-0", 1)] and killed == [old.actor]


def test_failed_starts_back_off_then_give_up():
    async def scenario():
        router = make_router()
        killed = []
        sup = Supervisor(
            router,
            lambda r, w, e: FakeActor(f"{w}-r{e}", fail_ready=True),
            killed.append,
            options=FAST,
            is_death=lambda e: isinstance(e, Dead),
        )
        dead = router.prefill[0].actor
        dead.dead = True
        sup.start()
        await asyncio.sleep(0.5)
        await sup.stop()
        return router, sup, killed, dead

    router, sup, killed, dead = run(scenario())
    assert not router.prefill[0].alive
    # The dead actor once, then every half-started one.
    assert sup.tries["prefill-0"] == 3 and killed[0] is dead and len(killed) == 4
    assert all(r.error for r in sup.history) and sup.restarts() == {}
    assert sup.given_up() == ["prefill-0"]


def test_layout_mismatch_is_a_failed_start():
    async def scenario():
        router = make_router()
        killed = []

        def check(layout):
            raise ValueError("incompatible KV layout")

        sup = Supervisor(
            router,
            lambda r, w, e: FakeActor(w),
            killed.append,
            check_layout=check,
            options=FAST,
            is_death=lambda e: isinstance(e, Dead),
        )
        router.prefill[0].actor.dead = True
        sup.start()
        await asyncio.sleep(0.3)
        await sup.stop()
        return router, sup, killed

    router, sup, killed = run(scenario())
    assert not router.prefill[0].alive and len(killed) == 1 + 3  # the dead actor, then each new one
    assert "incompatible" in sup.history[0].error


def test_slow_ready_is_killed_and_retried():
    async def scenario():
        router = make_router()
        killed, tries = [], []

        class Slow(FakeActor):
            async def _ready(self):
                await asyncio.sleep(10)

        def spawn(role, worker_id, epoch):
            tries.append(epoch)
            return Slow(worker_id) if len(tries) == 1 else FakeActor(worker_id, node="node-c")

        sup = Supervisor(router, spawn, killed.append, options=FAST, is_death=lambda e: isinstance(e, Dead))
        router.prefill[0].actor.dead = True
        router.mark_dead(router.prefill[0], Dead("killed"))
        sup.start()
        ok = await sup.wait_all_alive(3.0)
        await sup.stop()
        return ok, router, killed, sup

    ok, router, killed, sup = run(scenario())
    assert ok and router.prefill[0].node_id == "node-c"
    assert len(killed) == 2 and "not ready within" in sup.history[0].error  # the dead actor, the slow one


def test_ping_marks_dead_and_fails_its_requests():
    async def scenario():
        router = make_router()
        sup = Supervisor(
            router, lambda r, w, e: FakeActor(w), lambda a: None, options=FAST, is_death=lambda e: isinstance(e, Dead)
        )
        worker = router.prefill[0]
        worker.actor.dead = True
        await sup.check_once()  # ping sees the death; a restart task starts
        dead_after_ping = not worker.alive
        await sup.stop()
        return dead_after_ping

    assert run(scenario())


def test_stop_kills_a_replacement_still_starting():
    async def scenario():
        router = make_router()
        killed = []

        class Slow(FakeActor):
            async def _ready(self):
                await asyncio.sleep(10)

        opts = SupervisorOptions(check_s=0.01, ready_timeout_s=5.0)
        sup = Supervisor(
            router, lambda r, w, e: Slow(w), killed.append, options=opts, is_death=lambda e: isinstance(e, Dead)
        )
        dead = router.decode[0].actor
        dead.dead = True
        sup.start()
        await asyncio.sleep(0.2)
        await sup.stop()
        return dead, killed

    dead, killed = run(scenario())
    assert len(killed) == 2 and killed[0] is dead and killed[1] is not dead  # the dead one, the starting one


class FakeEncodeActor(FakeActor):
    """An encode worker: ready() has no KV layout (it holds no KV cache); it is never polled."""

    role = Role.ENCODE

    def layout(self):
        return None


def test_dead_encode_worker_is_restarted_and_swapped_in():
    async def scenario():
        info = ModelInfo("fake-llava", 64, 10, (), "float32", True)
        encode = [WorkerHandle(f"encode-{i}", Role.ENCODE, FakeEncodeActor(f"e{i}")) for i in range(2)]
        router = ClusterRouter(
            mode="disaggregated",
            tokenizer=None,
            model_info=info,
            kv_capacity_tokens=64,
            prefill=[WorkerHandle("prefill-0", Role.PREFILL, FakeActor("p0"))],
            decode=[WorkerHandle("decode-0", Role.DECODE, FakeActor("d0"))],
            encode=encode,
            max_inflight=4,
            default_timeout_s=5.0,
        )
        spawned, checked = [], []

        def spawn(role, worker_id, epoch):
            spawned.append((role, worker_id, epoch))
            return FakeEncodeActor(f"{worker_id}-r{epoch}", node="node-b")

        sup = Supervisor(
            router,
            spawn,
            lambda a: None,
            check_layout=checked.append,
            options=FAST,
            is_death=lambda e: isinstance(e, Dead),
        )
        old = router.encode[1]
        old.actor.dead = True  # the health ping finds it dead
        sup.start()
        await asyncio.sleep(0.05)
        assert await sup.wait_all_alive(2.0)
        await sup.stop()
        await router.shutdown()
        return router, encode, old, spawned, checked, sup

    router, encode, old, spawned, checked, sup = run(scenario())
    new = router.encode[1]
    assert router.encode is encode  # the controller's list: its teardown sees the replacement
    assert not old.alive and new is not old and router.encode[0].epoch == 0
    assert (new.worker_id, new.role, new.epoch, new.node_id, new.alive) == ("encode-1", Role.ENCODE, 1, "node-b", True)
    assert spawned == [(Role.ENCODE, "encode-1", 1)] and checked == []  # no KV layout to check
    assert new.actor.polls == 0 and sup.restarts() == {"encode-1": 1}
