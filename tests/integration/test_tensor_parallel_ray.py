"""A tensor-parallel worker on a local Ray (cluster/tp_group.py): the real SmolLM2 (9 heads, 3 KV
heads) served as `triptych serve` serves a YAML with a colocated pool at tensor_parallel 3 (three
rank actors in one placement group, one gloo group) answers chat prompts through the SDK
token-identically to transformers generate(); to the router it is one worker; killing one of its
ranks mid-request fails that worker's requests with an error naming it, within their deadline,
and the supervisor brings the whole group back."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.config import load_config
from cluster.serve import start_serving, stop_serving
from engine.sequence import FinishReason
from tests.helpers.router import LoopThread, assert_no_leaks, chat_request, collect, run_all

pytestmark = pytest.mark.slow

TP = 3
NEW_TOKENS = 24  # greedy: the first tokens of the reference's SMOL_NEW_TOKENS


YAML = f"""
version: 1
mode: colocated
ray: {{num_cpus: {TP}}}
server: {{grpc_port: 0, http_port: 0, admin_port: 0}}
pools:
  colocated: {{workers: 1, num_cpus: {TP}, tensor_parallel: {TP}}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from triptych import Client

    path = tmp_path_factory.mktemp("tp") / "tp3.yaml"
    path.write_text(YAML)
    loop = LoopThread()
    router, running = loop.run(start_serving(load_config(path), progress=lambda *_: None))
    client = Client(f"{running.connect_host}:{running.grpc_port}")
    yield loop, router, client
    client.close()
    loop.run(stop_serving(router, running, progress=lambda *_: None))
    loop.close()


def _ranks() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rank" in a["name"])


def test_tp3_worker_is_one_worker_and_token_identical(cluster, smol_chats, smol_reference):
    loop, router, client = cluster
    assert [w.worker_id for w in router.decode] == ["colocated-0"]  # three ranks, one worker
    assert len(_ranks()) == TP - 1

    async def status():
        return await router.decode[0].actor.status.remote()

    status = loop.run(status())
    assert status.alive and status.kv_blocks_used == 0
    with ThreadPoolExecutor(5) as pool:  # all five at once, through the SDK over loopback gRPC
        answers = list(
            pool.map(lambda c: client.complete(messages=c, max_tokens=NEW_TOKENS, temperature=0), smol_chats[:5])
        )
    assert all(not a.error for a in answers), [a.error for a in answers]
    assert [list(a.token_ids) for a in answers] == [ref[:NEW_TOKENS] for ref in smol_reference[:5]]
    assert_no_leaks(loop, router)


def test_killed_rank_fails_the_workers_requests_and_the_group_comes_back(cluster, smol_chats, smol_reference):
    import ray

    loop, router, _ = cluster
    worker = router.decode[0]
    follower = ray.get_actor(_ranks()[0], namespace=ray.get_runtime_context().namespace)

    async def scenario():
        requests = [chat_request(f"kill-{i}", smol_chats[i], 100, deadline_s=120.0) for i in range(3)]
        tasks = [asyncio.ensure_future(collect(router, r)) for r in requests]
        t = time.monotonic()
        while worker.inflight < 3:
            assert time.monotonic() - t < 60
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # decoding is under way
        ray.kill(follower)
        t = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return results, time.monotonic() - t

    results, elapsed = loop.run(scenario())
    assert all(r.final.finish_reason is FinishReason.ERROR for r in results), [r.final for r in results]
    assert all("colocated-0" in r.final.error for r in results), [r.final.error for r in results]
    assert elapsed < 60
    # the supervisor replaces the whole group: a new rank 0 and new followers, serving again
    deadline = time.monotonic() + 240
    while not (router.decode[0].alive and router.decode[0].epoch > worker.epoch):
        assert time.monotonic() < deadline, "the tensor-parallel worker did not come back"
        time.sleep(0.5)
    assert len(_ranks()) == TP - 1
    again = loop.run(run_all(router, [chat_request("after", smol_chats[0], NEW_TOKENS)]))
    assert again[0].final.error is None and again[0].token_ids == smol_reference[0][:NEW_TOKENS]
    assert_no_leaks(loop, router)
