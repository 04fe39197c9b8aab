"""Disaggregated serving on a local Ray: 1 prefill + 2 decode workers, KV over shared memory,
prefix caching on in both pools.

Greedy output equals the colocated engine and transformers generate(), and 20 concurrent prompts
sharing prefixes equal the cache-less engine; cancellation mid-prefill and mid-decode and a decode
worker killed mid-request leave no KV block or /dev/shm segment held.
"""

import asyncio
import time

import pytest

from cluster.config import parse_config
from cluster.controller import start_router
from engine.sequence import FinishReason, SamplingParams
from tests.helpers.models import SMOL_NEW_TOKENS
from tests.helpers.router import LoopThread, assert_no_leaks, assert_no_segments, chat_request, collect, run_all

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    loop = LoopThread()
    # prefix caching on: every answer below must be what the cache-less engine and generate() give
    config = parse_config(
        {"version": 1, "ray": {"num_cpus": 3}, "engine": {"prefix_caching": True}, "pools": {"decode": {"workers": 2}}},
        "test_disaggregated",
    )
    router = loop.run(start_router(config))
    yield loop, router
    loop.run(router.shutdown())
    loop.close()
    assert_no_segments()


def test_concurrent_greedy_identical(cluster, smol_chats, smol_reference, smol_colocated):
    # six of the 20 prompts over their whole range (5..2000 tokens), concurrently;
    # test_engine_smol.py runs all 20 through the engine, test_serve_signals.py others across simulated nodes
    picked = [0, 3, 7, 11, 15, 19]
    loop, router = cluster
    requests = [chat_request(f"eq-{i}", smol_chats[i], SMOL_NEW_TOKENS) for i in picked]
    results = loop.run(run_all(router, requests))
    got = [r.token_ids for r in results]
    assert all(r.final.error is None for r in results), [r.final.error for r in results]
    assert got == [smol_colocated[i] for i in picked]
    assert got == [smol_reference[i] for i in picked]
    assert all(r.final.timings.ttft_s > 0 and r.final.timings.prefill_s > 0 for r in results)
    assert_no_leaks(loop, router)


def test_concurrent_prompts_sharing_prefixes_are_token_identical_with_the_caches_on(cluster, smol, make_engine):
    """20 prompts sharing prefixes of 0, 13 (mid-block), 32 (whole blocks) and 47 tokens, one the
    whole of another's prefix and one repeated, all at once, with the prefill and decode workers'
    caches warm from 4 of them: the same tokens as the engine without a cache."""
    from cluster.router_api import GenerateInput
    from engine.sequence import SamplingParams
    from tests.prompts import shared_prefix_prompts

    loop, router = cluster
    prompts = shared_prefix_prompts(len(smol.tokenizer))
    greedy = SamplingParams(max_tokens=12)
    reference = [o.token_ids for o in make_engine(smol).generate(prompts, greedy)]

    def requests(tag, batch):
        return [GenerateInput(f"{tag}-{i}", greedy, token_ids=tuple(p)) for i, p in enumerate(batch)]

    warm = loop.run(run_all(router, requests("warm", prompts[:4])))
    both = loop.run(run_all(router, requests("shared", prompts)))
    assert [r.token_ids for r in warm] == reference[:4]
    assert [r.token_ids for r in both] == reference
    assert sum(r.final.cached_tokens for r in both) > 0
    # the router's index follows what each worker's cache reports: with everything finished, it
    # believes exactly as many blocks as each cache holds
    loop.run(router.cache_follower.sync())
    cached = {s.worker_id: s.kv_blocks_cached for s in loop.run(router.cluster_status()).workers}
    believed = {w.worker_id: router.dispatch.prefix_index.blocks_held(w) for w in router.prefill + router.decode}
    assert believed == cached and all(believed.values()), (believed, cached)
    assert_no_leaks(loop, router)


def test_poisoned_request_fails_alone(cluster, smol_chats, smol_reference):
    """A request whose sampling values slipped past the door (NaN temperature) fails in the prefill
    batch it shares with others; they get exactly their reference tokens and nothing is held."""
    from dataclasses import replace

    loop, router = cluster
    poison = SamplingParams(max_tokens=SMOL_NEW_TOKENS)
    object.__setattr__(poison, "temperature", float("nan"))
    reqs = [chat_request(f"ok-{i}", c, SMOL_NEW_TOKENS) for i, c in enumerate(smol_chats[:6])]
    bad = replace(chat_request("poisoned", smol_chats[2], SMOL_NEW_TOKENS), sampling=poison)
    results = loop.run(run_all(router, reqs[:3] + [bad] + reqs[3:]))
    bad_result = results.pop(3)
    assert bad_result.final.finish_reason is FinishReason.ERROR and "left no token to draw" in bad_result.final.error
    assert [r.token_ids for r in results] == smol_reference[:6]
    assert_no_leaks(loop, router)


def test_cancel_mid_prefill(cluster, smol_chats):
    loop, router = cluster

    async def scenario():
        req = chat_request("cancel-prefill", smol_chats[-1], 32)
        task = asyncio.ensure_future(collect(router, req))
        await asyncio.sleep(0.05)  # admitted, KV reserved, prefill running or queued
        assert await router.abort("cancel-prefill")
        return await task

    result = loop.run(scenario())
    assert result.final.finish_reason is FinishReason.ABORT
    assert_no_leaks(loop, router)


def test_cancel_mid_decode(cluster, smol_chats):
    loop, router = cluster

    async def scenario():
        stream = router.generate(chat_request("cancel-decode", smol_chats[3], 200))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()  # the client went away: the router aborts
        return seen

    assert loop.run(scenario()) == 3
    assert_no_leaks(loop, router)


def test_killed_decode_worker_fails_its_requests_only(cluster, smol_chats):
    import ray

    loop, router = cluster
    victim = router.decode[0]

    async def scenario():
        requests = [chat_request(f"kill-{i}", smol_chats[i % 6], 160) for i in range(6)]
        tasks = [asyncio.ensure_future(collect(router, r)) for r in requests]
        t = time.monotonic()
        while victim.inflight == 0 or router.decode[1].inflight == 0:
            assert time.monotonic() - t < 120, [(w.worker_id, w.inflight, w.alive) for w in router.decode]
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # decoding is under way on both workers
        ray.kill(victim.actor)
        t = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return results, time.monotonic() - t

    results, elapsed = loop.run(scenario())
    failed = [r for r in results if r.final.finish_reason is FinishReason.ERROR]
    finished = [r for r in results if r.final.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)]
    assert failed and finished, [(r.final.finish_reason, r.final.error) for r in results]
    assert all("decode worker decode-0 died" in r.final.error for r in failed)
    assert len(failed) + len(finished) == len(results)
    assert_no_leaks(loop, router)
