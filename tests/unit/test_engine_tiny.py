"""Greedy output of the engine equals transformers generate() on a tiny seeded Llama."""

import random

import pytest

from engine.sequence import SamplingParams
from tests.helpers.models import hf_greedy

LENGTHS = [1, 3, 7, 16, 17, 31, 50, 64, 100, 129, 200, 333]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(1234)
    return [[rng.randrange(3, 40000) for _ in range(n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    return [hf_greedy(tiny, p, NEW_TOKENS) for p in prompts]


def test_one_at_a_time(tiny, prompts, reference, make_engine):
    engine = make_engine(tiny, block_size=8, num_kv_blocks=256)
    for prompt, ref in zip(prompts, reference):
        out = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS))[0]
        assert out.token_ids == ref


def test_all_at_once_continuous_batch(tiny, prompts, reference, make_engine):
    engine = make_engine(tiny, block_size=8, num_kv_blocks=256, max_num_batched_tokens=128)
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outs] == reference


def test_preemption_under_small_cache(tiny, prompts, reference, make_engine):
    # 60 blocks of 8 tokens = 480 slots: the longest prompt alone needs 45 blocks, so the batch
    # cannot all fit and sequences are preempted and recomputed.
    engine = make_engine(tiny, block_size=8, num_kv_blocks=60, max_num_batched_tokens=64)
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference


def test_chunked_prefill_tiny_budget(tiny, prompts, reference, make_engine):
    engine = make_engine(tiny, block_size=4, num_kv_blocks=1024, max_num_batched_tokens=13, max_num_seqs=5)
    outs = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS))
    assert [o.token_ids for o in outs] == reference


def test_streaming_steps_join_to_final_text(tiny, prompts, make_engine):
    engine = make_engine(tiny, block_size=8, num_kv_blocks=256)
    ids = [engine.add_request(p, SamplingParams(max_tokens=NEW_TOKENS)) for p in prompts[:4]]
    texts = {rid: "" for rid in ids}
    tokens = {rid: [] for rid in ids}
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            tokens[out.request_id] += out.new_token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert set(finished) == set(ids)
    for rid in ids:
        assert texts[rid] == engine.tokenizer.decode(tokens[rid], skip_special_tokens=True)


def test_abort_frees_blocks(tiny, prompts, make_engine):
    engine = make_engine(tiny, block_size=8, num_kv_blocks=256)
    rid = engine.add_request(prompts[-1], SamplingParams(max_tokens=NEW_TOKENS))
    other = engine.add_request(prompts[3], SamplingParams(max_tokens=4))
    engine.step()
    assert engine.blocks.num_used_blocks > 0
    assert engine.abort(rid)
    assert not engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert other not in engine._seqs


def test_waiting_prompts_are_admitted_round_robin_over_tenants(tiny, make_engine):
    """A tenant's backlog does not stand between another tenant's prompt and the next step."""
    engine = make_engine(tiny, block_size=8, num_kv_blocks=256, max_num_batched_tokens=64, max_num_seqs=16)
    ids = tiny.tokenizer("The pools share the cluster fairly")["input_ids"] * 2
    for i in range(6):
        engine.add_request(ids, SamplingParams(max_tokens=2), f"flood-{i}", tenant="mallory")
    engine.add_request(ids, SamplingParams(max_tokens=2), "alice-0", tenant="alice")
    first = [e.seq.request_id for e in engine.scheduler.schedule()]
    assert first[:2] == ["flood-0", "alice-0"], first
    while engine.has_unfinished():
        engine.step()
