"""Prefill and decode pools of different tensor parallelism on a local Ray: the real SmolLM2 (9 heads,
3 KV heads) served as `triptych serve` serves a YAML with prefill `tensor_parallel: 3` (three rank
actors, each computing and sending its own KV head) and decode `tensor_parallel: 1` answers 5 chat
prompts through the SDK token-identically to transformers generate(); each pool sees one worker;
nothing stays held. Killing a prefill rank mid-prefill fails only the requests that worker was
prefilling, naming it, within their deadline; requests already decoding finish; the group comes
back and serves the same tokens; after shutdown no shared-memory segment is left."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.config import load_config
from cluster.serve import start_serving, stop_serving
from engine.sequence import FinishReason
from tests.helpers.router import LoopThread, assert_no_leaks, assert_no_segments, chat_request, collect, run_all

pytestmark = pytest.mark.slow

PREFILL_TP = 3
NEW_TOKENS = 24  # greedy: the first tokens of the reference's SMOL_NEW_TOKENS

YAML = f"""
version: 1
mode: disaggregated
ray: {{num_cpus: {PREFILL_TP + 1}}}
server: {{grpc_port: 0, http_port: 0, admin_port: 0}}
transport: {{backend: shm}}
pools:
  prefill: {{workers: 1, num_cpus: {PREFILL_TP}, tensor_parallel: {PREFILL_TP}}}
  decode: {{workers: 1, num_cpus: 1, tensor_parallel: 1}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from triptych import Client

    path = tmp_path_factory.mktemp("p3d1") / "p3d1.yaml"
    path.write_text(YAML)
    loop = LoopThread()
    router, running = loop.run(start_serving(load_config(path), progress=lambda *_: None))
    client = Client(f"{running.connect_host}:{running.grpc_port}")
    yield loop, router, client
    client.close()
    loop.run(stop_serving(router, running, progress=lambda *_: None))
    loop.close()
    assert_no_segments()


def _ranks() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "-rank" in a["name"])


def test_prefill_tp3_decode_tp1_serves_token_identical_answers(cluster, smol_chats, smol_reference):
    loop, router, client = cluster
    assert [w.worker_id for w in router.prefill] == ["prefill-0"]  # three ranks, one worker
    assert [w.worker_id for w in router.decode] == ["decode-0"]
    ranks = _ranks()
    assert len(ranks) == PREFILL_TP - 1 and all("prefill-0" in r for r in ranks)
    with ThreadPoolExecutor(5) as pool:
        answers = list(
            pool.map(lambda c: client.complete(messages=c, max_tokens=NEW_TOKENS, temperature=0), smol_chats[:5])
        )
    assert all(not a.error for a in answers), [a.error for a in answers]
    assert [list(a.token_ids) for a in answers] == [ref[:NEW_TOKENS] for ref in smol_reference[:5]]
    assert_no_leaks(loop, router)


def test_killed_prefill_rank_fails_only_what_it_was_prefilling(cluster, smol_chats, smol_reference):
    import ray

    loop, router, _ = cluster
    prefill = router.prefill[0]
    follower = ray.get_actor(_ranks()[0], namespace=ray.get_runtime_context().namespace)
    long_chats = [[{"role": "user", "content": f"Note {i}: " + "the cat sat on the mat. " * 250}] for i in range(3)]

    async def scenario():
        started = asyncio.Event()  # its prefill is done: it is on the decode worker
        decoding = asyncio.ensure_future(collect(router, chat_request("decoding", smol_chats[0], 120), started))
        await asyncio.wait_for(started.wait(), 60)
        t = time.monotonic()
        requests = [chat_request(f"kill-{i}", c, 8, deadline_s=120.0) for i, c in enumerate(long_chats)]
        tasks = [asyncio.ensure_future(collect(router, r)) for r in requests]
        while prefill.inflight < 3:
            assert time.monotonic() - t < 60
            await asyncio.sleep(0.01)
        ray.kill(follower)
        t = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return results, time.monotonic() - t, await decoding

    results, elapsed, decoding = loop.run(scenario())
    failed = [r for r in results if r.final.finish_reason is FinishReason.ERROR]
    assert failed, "no request was in prefill when its rank died"
    # prefill is retried elsewhere; with no other prefill worker it fails, naming the dead one
    assert all("prefill worker prefill-0 died" in r.final.error for r in failed), [r.final.error for r in failed]
    assert elapsed < 60
    assert decoding.final.error is None and decoding.token_ids[:NEW_TOKENS] == smol_reference[0][:NEW_TOKENS]
    deadline = time.monotonic() + 240
    while not (router.prefill[0].alive and router.prefill[0].epoch > prefill.epoch):
        assert time.monotonic() < deadline, "the tensor-parallel prefill worker did not come back"
        time.sleep(0.5)
    assert len(_ranks()) == PREFILL_TP - 1
    again = loop.run(run_all(router, [chat_request("after", smol_chats[1], NEW_TOKENS)]))
    assert again[0].final.error is None and again[0].token_ids == smol_reference[1][:NEW_TOKENS]
    assert_no_leaks(loop, router)
