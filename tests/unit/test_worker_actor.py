"""WorkerActor without Ray: epoch fencing, switch preconditions, and a prefill -> decode request
path that gives the same greedy tokens before and after both workers swap roles (no reload); a
colocated worker owns a plain KV cache (no transport) and stops cleanly."""

from __future__ import annotations

import asyncio

import pytest

from cluster.worker_actor import RoleSwitchError, StaleEpochError, WorkerActor
from engine.worker_api import Role
from decode_workers.decode_core import QUARANTINE_S, DecodeOptions
from engine.config import EngineConfig
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams
from prefill_workers.prefill_core import PrefillOptions, PrefillTask
from tests.helpers.models import hf_greedy


def _options() -> dict:
    cfg = EngineConfig(block_size=16, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=8)
    return {Role.PREFILL: PrefillOptions(cfg, backend="fake"), Role.DECODE: DecodeOptions(cfg, backend="fake")}


def _worker(tiny, wid: str, role: Role) -> WorkerActor:
    return WorkerActor(wid, None, _options(), 1, role, epoch=0, loaded=tiny)


async def _generate(
    prefill: WorkerActor,
    decode: WorkerActor,
    rid: str,
    ids: list[int],
    n: int,
    sampling: SamplingParams | None = None,
    resume: tuple[int, int] | None = None,
) -> list[int]:
    sampling = sampling or SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    desc = await decode.reserve(rid, len(ids), 30.0, epoch=decode.epoch)
    task = PrefillTask(rid, tuple(ids), sampling, desc, sampled_before=resume[0] if resume else 0)
    result = await prefill.prefill(task, epoch=prefill.epoch)
    assert result.error is None, result.error
    out = await decode.activate(rid, ids, result.first_token, sampling, epoch=decode.epoch, resume=resume)
    tokens = list(out.new_token_ids)
    finished = out.finished
    while not finished:
        for step in await decode.poll(1.0, epoch=decode.epoch):
            for o in step:
                if o.request_id == rid:
                    tokens += o.new_token_ids
                    finished = o.finished
    return tokens


def test_switch_keeps_weights_and_output(tiny, monkeypatch):
    ids = tiny.tokenizer("The three pools of a serving cluster are")["input_ids"]
    want = hf_greedy(tiny, ids, 12)

    async def scenario():
        a, b = _worker(tiny, "a", Role.PREFILL), _worker(tiny, "b", Role.DECODE)
        ready = (await a.ready(), await b.ready())
        assert (ready[0].info.role, ready[1].info.role) == (Role.PREFILL, Role.DECODE)
        assert ready[0].layout == ready[1].layout is not None
        before = await _generate(a, b, "r1", ids, 12)
        assert await a.idle() and await b.idle()
        # A switch builds the new role on the weights in memory: loading any would fail here.
        monkeypatch.setattr(LoadedModel, "load", classmethod(lambda cls, *args: pytest.fail("weights reloaded")))
        ready_a, switch_s = await a.set_role(Role.DECODE, 1)
        ready_b, _ = await b.set_role(Role.PREFILL, 1)
        after = await _generate(b, a, "r2", ids, 12)
        assert switch_s > 0 and ready_a.layout == ready_b.layout == ready[0].layout
        assert (a.role, a.epoch, ready_a.info.role, b.role, b.epoch, ready_b.info.role) == (
            Role.DECODE,
            1,
            "decode",
            Role.PREFILL,
            1,
            "prefill",
        )
        assert await a.idle() and await b.idle()
        await a.stop()
        await b.stop()
        return before, after

    before, after = asyncio.run(scenario())
    assert before == want and after == want


def test_epoch_fencing_and_switch_preconditions(tiny):
    async def scenario():
        w = _worker(tiny, "d", Role.DECODE)
        sampling = SamplingParams(max_tokens=4)
        with pytest.raises(StaleEpochError, match="epoch 0, the call was for epoch 1"):
            await w.reserve("x", 8, 10.0, epoch=1)
        with pytest.raises(StaleEpochError, match="decode worker, the call needs prefill"):
            await w.prefill(PrefillTask("x", (1, 2), sampling, None), epoch=0)
        assert await w.reserve("held", 20, 10.0, epoch=0) is not None
        with pytest.raises(RoleSwitchError, match="not idle"):
            await w.set_role(Role.PREFILL, 1)
        assert await w.cancel("held")
        await asyncio.sleep(QUARANTINE_S + 0.1)  # blocks of an unfinished transfer wait this long
        with pytest.raises(RoleSwitchError, match="refusing epoch 0"):
            await w.set_role(Role.PREFILL, 0)
        with pytest.raises(RoleSwitchError, match="cannot take role colocated"):
            await w.set_role(Role.COLOCATED, 5)
        await w.set_role(Role.PREFILL, 3)
        # An order from before the switch (epoch 0, decode) lands nowhere.
        with pytest.raises(StaleEpochError):
            await w.reserve("late", 8, 10.0, epoch=0)
        with pytest.raises(StaleEpochError):
            await w.poll(0.01, epoch=0)
        status = await w.status()
        assert (status.role, w.epoch) == (Role.PREFILL, 3)
        await w.stop()

    asyncio.run(scenario())


def test_seeded_sampling_is_one_stream_across_workers_and_a_resume(tiny, make_engine):
    """A seeded sampled request gives the same tokens colocated and split over a prefill and a
    decode worker (the decode worker skips the draw of the prefill worker's first token), and
    the same again when it is cut after k tokens and re-prefilled (both workers skip k draws)."""
    ids = tiny.tokenizer("The three pools of a serving cluster are")["input_ids"]
    sampling = SamplingParams(max_tokens=16, temperature=1.0, seed=11, ignore_eos=True)
    engine = make_engine(tiny, block_size=16, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=8)
    want = engine.generate([ids], sampling)[0].token_ids
    k = 6
    rest = SamplingParams(max_tokens=16 - k, temperature=1.0, seed=11, ignore_eos=True)

    async def scenario():
        a, b = _worker(tiny, "a", Role.PREFILL), _worker(tiny, "b", Role.DECODE)
        split = await _generate(a, b, "s1", ids, 16, sampling)
        resumed = await _generate(a, b, "s2", ids + want[:k], 16 - k, rest, resume=(k, 0))
        await a.stop()
        await b.stop()
        return split, resumed

    split, resumed = asyncio.run(scenario())
    assert len(set(want)) > 4  # really sampled, not one token repeated
    assert split == want
    assert want[:k] + resumed == want
    # Colocated re-prefill: the engine skips the k draws itself.
    rid = engine.add_request(ids + want[:k], rest, "c-resumed", resume=(k, 0))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == rid for t in o.new_token_ids]
    assert want[:k] + tokens == want


def test_colocated_worker_serves_on_a_kv_cache_of_its_own(tiny):
    """A colocated worker runs whole requests on a plain KV cache: no transport (no shared-memory
    segment), no other role's calls, and its status shows the cache."""
    from decode_workers.colocated_core import ColocatedOptions
    from kv_transfer import segment

    ids = tiny.tokenizer("The three pools of a serving cluster are")["input_ids"]
    want = hf_greedy(tiny, ids, 12)
    segments = segment.list_segments()

    async def scenario():
        cfg = EngineConfig(block_size=16, num_kv_blocks=64, max_num_batched_tokens=256, max_num_seqs=8)
        w = WorkerActor("c", None, {Role.COLOCATED: ColocatedOptions(cfg)}, 1, Role.COLOCATED, loaded=tiny)
        ready = await w.ready()
        assert ready.info.role is Role.COLOCATED and ready.layout is not None and await w.roles() == (Role.COLOCATED,)
        with pytest.raises(StaleEpochError, match="colocated worker, the call needs decode"):
            await w.reserve("x", 8, 10.0, epoch=0)
        await w.submit("c1", ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), epoch=0)
        tokens, finished = [], False
        while not finished:
            for step in await w.poll(1.0, epoch=0):
                for out in step:
                    tokens += out.new_token_ids
                    finished = out.finished
        status = await w.status()
        assert await w.idle() and (status.role, status.kv_blocks_used, status.kv_blocks_total) == (
            Role.COLOCATED,
            0,
            64,
        )
        await w.stop()
        return tokens

    assert asyncio.run(scenario()) == want
    assert segment.list_segments() == segments
