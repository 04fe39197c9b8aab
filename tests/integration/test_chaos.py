"""Chaos on a simulated multi-node Ray cluster: workers die under a steady request stream.

Cluster: a head (the router, this process) and two nodes, each offering {prefill: 1, decode: 1},
so 2 prefill + 2 decode workers, one of each per node; KV over shared memory (all simulated
nodes share this machine). One cluster serves the three scenarios, in order (after a check of
n > 1 choices sharing their prefill with caching off, on the intact cluster):

    kill a prefill worker ─▶ its requests are retried on the other one: none fails
    kill a decode worker  ─▶ its requests fail naming the worker; the rest finish
    remove a whole node   ─▶ both of its workers die; a node with the same resources is added
                             back and the supervisor places the replacements there

Each time: every request ends (finished, or an error that says why) within its deadline, the
supervisor restarts the dead workers and they rejoin, the cluster serves normally again, and no
KV block or /dev/shm segment is left held.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import pytest

from cluster.config import parse_config
from cluster.controller import start_router
from cluster.router_api import RouterError
from engine.sequence import FinishReason
from kv_transfer.segment import creator_pid, held_segments
from tests.helpers.router import LoopThread, chat_request, collect, run_all

pytestmark = pytest.mark.slow

DEADLINE_S = 20.0  # every request's deadline
SLACK_S = 2.0  # how late past its deadline a request may end (event-loop scheduling)
REJOIN_S = 60.0  # restarted workers must be serving again within this (model load on a busy 2-core box)
NODE_RESOURCES = {"prefill": 1, "decode": 1}
CLEAR_ERRORS = ("died", "deadline", "no live worker", "is dead", "prefill of", "failed on")


@dataclass
class Outcome:
    started: float
    ended: float
    reason: FinishReason | None = None  # None: refused before streaming (RouterError)
    error: str | None = None


@dataclass
class Stream:
    """`clients` closed-loop clients sending short chats until stopped."""

    router: object
    prompts: list
    clients: int = 3
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event | None = None
    _tasks: list = field(default_factory=list)

    def start(self) -> None:
        self._stop = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), DEADLINE_S + 3 * SLACK_S)
        return self.outcomes

    async def _client(self, i: int) -> None:
        rng = random.Random(i)
        n = 0
        while not self._stop.is_set():
            n += 1
            req = chat_request(
                f"chaos-{i}-{n}-{time.monotonic_ns()}", rng.choice(self.prompts), 8, deadline_s=DEADLINE_S
            )
            t = time.monotonic()
            try:
                result = await collect(self.router, req)
                self.outcomes.append(Outcome(t, time.monotonic(), result.final.finish_reason, result.final.error))
            except RouterError as exc:
                self.outcomes.append(Outcome(t, time.monotonic(), None, exc.message))
                await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def chaos():
    import ray
    from ray.cluster_utils import Cluster

    # Fast node-death detection, so the node scenario does not wait out Ray's default ~15 s.
    sim = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "_system_config": {
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 3,
                "health_check_initial_delay_ms": 1000,
            },
        },
    )
    nodes = [sim.add_node(num_cpus=2, resources=dict(NODE_RESOURCES)) for _ in range(2)]
    loop = LoopThread()
    config = parse_config(
        {
            "version": 1,
            "transport": {"backend": "shm"},
            "engine": {"num_kv_blocks": 256, "max_num_seqs": 16},
            "pools": {"prefill": {"workers": 2}, "decode": {"workers": 2}},
        },
        "test_chaos",
    )
    router = loop.run(start_router(config, ray_address=sim.address, progress=lambda *_: None))
    from tests.prompts import chat_prompts

    prompts = chat_prompts(router.tokenizer, [20, 60, 120, 200, 300])
    pids = loop.run(_pids(router))
    yield loop, router, sim, nodes, prompts, pids
    loop.run(router.shutdown())
    loop.close()
    ray.shutdown()
    sim.shutdown()


def _check_outcomes(outcomes: list[Outcome]) -> tuple[list[Outcome], list[Outcome]]:
    assert outcomes, "the stream sent nothing"
    late = [o for o in outcomes if o.ended - o.started > DEADLINE_S + SLACK_S]
    assert not late, f"{len(late)} requests outlived their deadline: {late[:3]}"
    done = [o for o in outcomes if o.reason in (FinishReason.STOP, FinishReason.LENGTH)]
    failed = [o for o in outcomes if o not in done]
    vague = [o for o in failed if not o.error or not any(s in o.error for s in CLEAR_ERRORS)]
    assert not vague, f"errors that do not say why: {vague[:3]}"
    return done, failed


async def _pids(router) -> set[int]:
    infos = await asyncio.gather(*(w.actor.ready.remote() for w in router.prefill + router.decode if w.alive))
    return {ready.info.pid for ready in infos}


def _assert_no_leaks(loop, router, pids: set[int]) -> None:
    """Every block free, no request held, and no shared memory of this cluster's workers still held
    but a live decode worker's KV cache and control table ("kv", "ctl"): nothing of a dead worker
    (a sender lets go of it within a second), no per-request payload. Only this cluster's pids
    count: a shared machine runs other tests."""
    assert loop.run(router.wait_idle(30)), "KV blocks or requests still held after the test"
    live = loop.run(_pids(router))
    pids |= live

    def left() -> list[str]:
        out = []
        for name in held_segments():
            pid, kind = creator_pid(name), name.rsplit("-", 1)[1]
            if pid in pids and (pid not in live or kind not in ("kv", "ctl")):
                out.append(name)
        return out

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left(), f"shared memory left: {left()}"


def _serves_normally(loop, router, prompts) -> None:
    """Every worker back, and a burst of requests all finish."""
    reqs = [
        chat_request(f"after-{i}-{time.monotonic_ns()}", prompts[i % len(prompts)], 8, deadline_s=DEADLINE_S)
        for i in range(6)
    ]
    results = loop.run(run_all(router, reqs))
    assert all(r.final.error is None for r in results), [r.final.error for r in results]


def _rejoin(loop, router, ids: set[str], since: float) -> float:
    assert loop.run(router.supervisor.wait_all_alive(REJOIN_S), REJOIN_S + 10), (
        f"workers not back within {REJOIN_S}s: {[(w.worker_id, w.alive) for w in router.prefill + router.decode]}"
    )
    took = time.monotonic() - since
    epochs = {w.worker_id: w.epoch for w in router.prefill + router.decode}
    assert all(epochs[i] >= 1 for i in ids), epochs
    status = loop.run(router.cluster_status())
    assert all(w.alive for w in status.workers) and {w.worker_id: w.epoch for w in status.workers} == epochs
    print(f"\n{sorted(ids)} rejoined {took:.1f}s after the fault; epochs {epochs}")
    return took


async def _run_with_fault(router, prompts, fault, settle_s: float = 4.0) -> tuple[list[Outcome], float]:
    stream = Stream(router, prompts)
    stream.start()
    await asyncio.sleep(2.0)
    t = await fault()
    await asyncio.sleep(settle_s)
    return await stream.stop(), t


def test_the_choices_of_one_request_share_its_prefill_without_caching(chaos):
    """Before the chaos (caching is off here, 2 prefill workers): the choices of one request (n > 1,
    one `choices_of`) started after the first one's first token go to its prefill worker and
    compute only the prompt's last block; a request with another id computes it all; greedy
    choices answer alike."""
    from cluster.router_api import ChatMessage, GenerateInput
    from engine.config import EngineConfig
    from engine.sequence import SamplingParams
    from tests.helpers.router import collect

    loop, router, _, _, prompts, _ = chaos
    messages = tuple(ChatMessage(m["role"], m["content"]) for m in prompts[3])
    greedy = SamplingParams(max_tokens=4, temperature=0.0)

    def choice(rid: str, group: str) -> GenerateInput:
        return GenerateInput(rid, greedy, messages=messages, choices_of=group)

    async def run():
        first = asyncio.Event()
        zero = asyncio.create_task(collect(router, choice("n-0", "g"), first))
        await first.wait()
        rest = await asyncio.gather(*(collect(router, choice(f"n-{i}", "g")) for i in (1, 2)))
        return [await zero, *rest, await collect(router, choice("other", "h"))]

    results = loop.run(run())
    assert all(r.final.error is None for r in results), [r.final.error for r in results]
    bs = EngineConfig().block_size  # the deployment's (not set above)
    full = (results[0].final.prompt_tokens - 1) // bs * bs
    assert [r.final.cached_tokens for r in results] == [0, full, full, 0] and full > 0
    assert len({tuple(r.token_ids) for r in results}) == 1
    assert loop.run(router.wait_idle(30))


def test_killed_prefill_worker_requests_are_retried(chaos):
    import ray

    loop, router, _, _, prompts, pids = chaos
    victim = router.prefill[0]

    async def fault():
        end = time.monotonic() + 10
        while victim.inflight == 0 and time.monotonic() < end:  # kill it while it holds a request
            await asyncio.sleep(0.005)
        ray.kill(victim.actor)
        return time.monotonic()

    outcomes, t = loop.run(_run_with_fault(router, prompts, fault))
    done, failed = _check_outcomes(outcomes)
    assert not failed, [o.error for o in failed]
    _rejoin(loop, router, {victim.worker_id}, t)
    _serves_normally(loop, router, prompts)
    _assert_no_leaks(loop, router, pids)


def test_killed_decode_worker_fails_only_its_requests(chaos):
    import ray

    loop, router, _, _, prompts, pids = chaos
    victim = router.decode[0]

    async def fault():
        end = time.monotonic() + 10
        while victim.inflight == 0 and time.monotonic() < end:
            await asyncio.sleep(0.005)
        ray.kill(victim.actor)
        return time.monotonic()

    outcomes, t = loop.run(_run_with_fault(router, prompts, fault))
    done, failed = _check_outcomes(outcomes)
    assert done
    assert all(f"decode worker {victim.worker_id} died" in o.error for o in failed), [o.error for o in failed]
    _rejoin(loop, router, {victim.worker_id}, t)
    _serves_normally(loop, router, prompts)
    _assert_no_leaks(loop, router, pids)


def test_removed_node_is_replaced_on_a_new_node(chaos):
    loop, router, sim, nodes, prompts, pids = chaos
    gone = nodes[1]
    victims = {w.worker_id for w in router.prefill + router.decode if w.node_id == gone.node_id}
    assert len(victims) == 2, [(w.worker_id, w.node_id) for w in router.prefill + router.decode]

    async def fault():
        sim.remove_node(gone, allow_graceful=False)
        return time.monotonic()

    outcomes, t = loop.run(_run_with_fault(router, prompts, fault, settle_s=8.0))
    _check_outcomes(outcomes)
    assert all(not w.alive for w in router.prefill + router.decode if w.worker_id in victims)
    fresh = sim.add_node(num_cpus=2, resources=dict(NODE_RESOURCES))
    nodes.append(fresh)
    _rejoin(loop, router, victims, t)
    placed = {w.worker_id: w.node_id for w in router.prefill + router.decode if w.worker_id in victims}
    assert set(placed.values()) == {fresh.node_id}, placed
    _serves_normally(loop, router, prompts)
    _assert_no_leaks(loop, router, pids)
