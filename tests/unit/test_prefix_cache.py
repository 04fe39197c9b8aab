"""Prefix caching in the engine (engine/kv_cache.py): hash-chained full blocks, reference counts,
LRU eviction only on demand; greedy output with caching on is token-identical to caching off and
to transformers generate(), the cached prefix is not computed again, and a small pool evicts
instead of refusing."""

from __future__ import annotations

import time

import pytest
import torch

from engine.errors import EngineError
from engine.kv_cache import SHARED, BlockManager, CacheKey, cache_key, choices_salt, image_hash, prefix_hashes
from engine.sequence import SamplingParams
from tests.helpers.models import hf_greedy
from tests.prompts import shared_prefix_prompts

BS = 4


def _computed(m: BlockManager, tokens: list[int], key: CacheKey = SHARED) -> tuple[list[int], list[bytes]]:
    """A table whose K/V are all computed, registered as the scheduler does."""
    table: list[int] = []
    m.allocate(table, len(tokens))
    hashes: list[bytes] = []
    m.register(table, hashes, tokens, len(tokens), key)
    return table, hashes


def test_freed_full_blocks_stay_cached_and_are_found_again():
    m = BlockManager(8, BS, prefix_caching=True)
    tokens = list(range(100, 110))  # 2 full blocks + 2 tokens
    table, _ = _computed(m, tokens)
    m.free(table)
    assert (m.num_cached_blocks, m.pool.num_free, m.num_used_blocks) == (2, 6, 0)
    m.check()
    blocks, hashes = m.match_prefix(tokens + [7, 8, 9])
    assert len(blocks) == 2 and len(hashes) == 2
    # a different token in block 1 breaks the chain from there; a different salt from the start
    assert len(m.match_prefix(tokens[:5] + [0] + tokens[6:] + [1])[0]) == 1
    assert m.match_prefix(tokens + [1], cache_key("tenant-b")) == ([], [])
    new: list[int] = []
    assert m.take_prefix(new, blocks, 13) == 2 * BS
    m.allocate(new, 13)
    assert new[:2] == blocks and m.num_cached_blocks == 0 and m.num_used_blocks == 4
    m.check()
    m.free(new)
    m.check()


def test_a_prompt_that_is_all_cached_blocks_leaves_its_last_block_to_compute():
    m = BlockManager(8, BS, prefix_caching=True)
    tokens = list(range(8))
    table, _ = _computed(m, tokens)
    m.free(table)
    assert len(m.match_prefix(tokens)[0]) == 1  # block 1 holds the last token: its logits are needed
    assert len(m.match_prefix(tokens + [9])[0]) == 2


def test_cached_blocks_are_evicted_only_when_no_free_block_is_left():
    m = BlockManager(4, BS, prefix_caching=True)
    a, _ = _computed(m, list(range(8)))
    b, _ = _computed(m, list(range(50, 58)))
    m.free(a)
    m.free(b)  # 4 cached, 0 free; a's blocks are older
    assert m.num_free_blocks == 4 and m.can_allocate([], 16)
    t: list[int] = []
    m.allocate(t, 8)  # evicts a's two blocks (least recently used), keeps b's
    assert m.evictions == 2 and len(m.match_prefix(list(range(50, 58)) + [0])[0]) == 2
    assert m.match_prefix(list(range(8)) + [0]) == ([], [])
    # taking b's cached blocks makes them unevictable: no room then for 2 more
    blocks, _ = m.match_prefix(list(range(50, 58)) + [0])
    assert not m.can_allocate([], 16, blocks) and m.can_allocate([], 8, blocks)
    m.check()


def test_shared_blocks_are_freed_by_their_last_holder_and_double_frees_refused():
    m = BlockManager(6, BS, prefix_caching=True)
    tokens = list(range(9))
    a, _ = _computed(m, tokens)
    blocks, _ = m.match_prefix(tokens)
    b: list[int] = []
    m.take_prefix(b, blocks, 9)
    m.allocate(b, 9)
    m.free(a)
    assert m.num_used_blocks == 3 and m.num_cached_blocks == 0  # b still holds the shared two
    with pytest.raises(EngineError, match="not held"):
        m.free([5])  # never taken
    twice = [b[0], b[0]]
    with pytest.raises(EngineError, match="twice"):
        m.free(twice)
    m.free(b)
    assert m.num_used_blocks == 0 and m.num_cached_blocks == 2
    m.check()


def test_without_caching_nothing_is_kept():
    m = BlockManager(4, BS)
    t, _ = _computed(m, list(range(8)))
    m.free(t)
    assert m.num_cached_blocks == 0 and m.match_prefix(list(range(9))) == ([], []) and m.all_free()


def test_without_caching_the_choices_of_one_request_still_share_their_blocks():
    """A request's choices (n > 1) carry a salt only they have (choices_salt): their blocks are
    cached even with caching off, found by the same salt only, and their references counted."""
    m = BlockManager(8, BS)
    tokens = list(range(100, 110))
    group = cache_key(choices_salt("g1"))
    table, _ = _computed(m, tokens, group)
    assert m.match_prefix(tokens, SHARED) == ([], []) and m.match_prefix(tokens, cache_key("g1")) == ([], [])
    assert m.match_prefix(tokens, cache_key(choices_salt("g2"))) == ([], [])
    blocks, _ = m.match_prefix(tokens, cache_key(choices_salt("g1")))
    assert blocks == table[:2]
    second: list[int] = []
    m.take_prefix(second, blocks, len(tokens))
    m.allocate(second, len(tokens))
    m.free(table)  # the shared blocks stay held by the second choice
    assert m.num_used_blocks == 3 and m.num_cached_blocks == 0
    m.check()
    m.free(second)
    assert m.all_free() and m.num_cached_blocks == 2  # evicted on demand, like any cached block
    m.check()
    big: list[int] = []
    m.allocate(big, 8 * BS)  # the whole pool: both cached blocks are evicted
    assert m.num_cached_blocks == 0 and m.match_prefix(tokens, group) == ([], [])
    m.free(big)
    m.check()


def test_without_caching_the_later_choices_compute_only_the_prompts_last_block(tiny, make_engine):
    """Colocated, caching off: choice 0 of a request, then (after its prefill) choices 1 and 2 with
    the same choices salt compute only the prompt's last block; a request with another salt computes
    it all; every output is transformers' (greedy)."""
    engine = make_engine(tiny, block_size=8, num_kv_blocks=64)
    prompt = torch.randint(3, len(tiny.tokenizer), (29,), generator=torch.Generator().manual_seed(5)).tolist()
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    salt = choices_salt("req-1")
    engine.add_request(prompt, greedy, "c0", cache_salt=salt)
    outs, cached = {}, {}
    for o in engine.step():  # c0's prefill: its first token
        outs[o.request_id], cached[o.request_id] = list(o.new_token_ids), o.cached_tokens
    for rid, s in (("c1", salt), ("c2", salt), ("other", choices_salt("req-2")), ("plain", "")):
        engine.add_request(prompt, greedy, rid, cache_salt=s)
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            cached.setdefault(o.request_id, o.cached_tokens)
    # c1 and c2 matched c0's 3 full blocks (24 of 29 tokens)
    assert cached == {"c0": 0, "c1": 24, "c2": 24, "other": 0, "plain": 0}
    reference = hf_greedy(tiny, prompt, 6)
    assert all(out == reference for out in outs.values()), outs
    engine.blocks.check()


# ------------------------------------------------------------------ the engine
@pytest.mark.parametrize("block_size", [8, 16])
def test_caching_on_is_token_identical_to_off_and_to_transformers(tiny, make_engine, block_size):
    # (the real SmolLM2 runs these 20 prompts through the cluster: tests/integration/test_disaggregated.py)
    prompts = shared_prefix_prompts(len(tiny.tokenizer))
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    reference = [hf_greedy(tiny, p, 12) for p in prompts]
    off = make_engine(tiny, block_size=block_size, num_kv_blocks=256, max_num_batched_tokens=64)
    on = make_engine(tiny, block_size=block_size, num_kv_blocks=256, max_num_batched_tokens=64, prefix_caching=True)
    warm = on.generate(prompts[:4], greedy)  # some prefixes cached before the batch of 20
    outs_on = on.generate(prompts, greedy)
    outs_off = off.generate(prompts, greedy)
    assert [o.token_ids for o in warm] == reference[:4]
    for i, (ref, a, b) in enumerate(zip(reference, outs_on, outs_off)):
        assert a.token_ids == ref and b.token_ids == ref, f"prompt {i} ({len(prompts[i])} tokens)"
    assert on.blocks.hit_tokens > 0 and off.blocks.hit_tokens == 0
    on.blocks.check()


@pytest.mark.parametrize("model", ["tiny", "smol"])
def test_a_conversation_reuses_its_history_and_computes_only_the_rest(request, make_engine, model):
    tiny = request.getfixturevalue(model)  # the seeded tiny Llama, and the real SmolLM2
    engine = make_engine(tiny, block_size=8, num_kv_blocks=256, prefix_caching=True)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    gen = torch.Generator().manual_seed(5)
    history = torch.randint(3, len(tiny.tokenizer), (21,), generator=gen).tolist()
    computed = []
    real_forward = engine.runner.forward

    def counting(batch, *args, **kwargs):
        computed.append(sum(e.num_new_tokens for e in batch if e.seq.request_id.startswith("turn")))
        return real_forward(batch, *args, **kwargs)

    engine.runner.forward = counting
    previous = 0
    for turn in range(4):
        before = len(computed)
        rid = engine.add_request(history, greedy, f"turn{turn}")
        seq = engine._seqs[rid]
        out = []
        while engine.has_unfinished():
            for o in engine.step():
                out += o.new_token_ids
        assert out == hf_greedy(tiny, history, 10)
        if turn:
            # everything of the previous turn but the answer's last token (never fed back) is cached
            assert seq.num_cached_tokens == (previous - 1) // 8 * 8
            assert sum(computed[before:]) == len(history) - seq.num_cached_tokens + len(out) - 1
        previous = len(history) + len(out)
        history = history + out + torch.randint(3, len(tiny.tokenizer), (7,), generator=gen).tolist()
    engine.blocks.check()


def test_a_small_pool_evicts_cached_blocks_instead_of_refusing(tiny, make_engine):
    gen = torch.Generator().manual_seed(9)
    distinct = [torch.randint(3, len(tiny.tokenizer), (n,), generator=gen).tolist() for n in (30, 45, 60, 20, 52)]
    prompts = [p for p in distinct * 2 for _ in range(2)]  # each twice in a row: the second finds the first's blocks
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    # 16 blocks of 8: one long prompt's 9 blocks fit, all the cached ones of the earlier do not
    on = make_engine(tiny, block_size=8, num_kv_blocks=16, max_num_batched_tokens=64, prefix_caching=True)
    off = make_engine(tiny, block_size=8, num_kv_blocks=16, max_num_batched_tokens=64)
    outs_on = [on.generate([p], greedy)[0] for p in prompts]
    outs_off = [off.generate([p], greedy)[0] for p in prompts]
    assert all(o.error is None for o in outs_on)
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off]
    assert on.blocks.evictions > 0 and on.blocks.hit_tokens > 0
    on.blocks.check()
    both = on.generate(distinct, greedy)  # a batch that needs evictions and preemptions mid-step
    assert [o.token_ids for o in both] == [o.token_ids for o in outs_off[0:10:2]]
    on.blocks.check()


def test_a_prefill_worker_computes_only_what_its_cache_lacks_and_still_ships_every_block(tiny):
    """Disaggregated: the prefill worker's own cache of earlier prompts; the decode worker (no
    cache) still receives every block of the prompt, so its output is that of generate()."""
    from decode_workers.decode_core import DecodeCore, DecodeOptions
    from engine.config import EngineConfig
    from prefill_workers.prefill_core import PrefillCore, PrefillOptions, PrefillTask

    config = EngineConfig(block_size=8, num_kv_blocks=128, max_num_batched_tokens=512, prefix_caching=True)
    prefill = PrefillCore(PrefillOptions(config, backend="shm"), tiny)
    decode = DecodeCore(DecodeOptions(EngineConfig(block_size=8, num_kv_blocks=128), backend="shm"), tiny)
    gen = torch.Generator().manual_seed(4)
    system = torch.randint(3, len(tiny.tokenizer), (37,), generator=gen).tolist()
    prompts = [system + torch.randint(3, len(tiny.tokenizer), (n,), generator=gen).tolist() for n in (6, 19, 3)]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    computed = []
    real_forward = prefill.runner.forward
    prefill.runner.forward = lambda batch, *a, **k: computed.append([e.num_new_tokens for e in batch]) or real_forward(
        batch, *a, **k
    )
    try:
        for i, p in enumerate(prompts):
            desc = decode.reserve(f"p{i}", len(p))
            (result,) = prefill.run_batch([PrefillTask(f"p{i}", tuple(p), greedy, desc, cache_salt="")])
            assert result.error is None
            assert result.cached_tokens == (0 if i == 0 else 32)  # the system prompt's 4 full blocks
            assert computed[-1] == [len(p) - result.cached_tokens]
            out = list(decode.activate(f"p{i}", p, result.first_token, greedy).new_token_ids)
            while decode.has_work():
                for o in decode.step():
                    out += o.new_token_ids
            assert out == hf_greedy(tiny, p, 8), f"prompt {i}"
        salted = decode.reserve("s", len(prompts[1]))
        (result,) = prefill.run_batch([PrefillTask("s", tuple(prompts[1]), greedy, salted, cache_salt="other")])
        assert result.cached_tokens == 0  # another salt never reads these blocks
        decode.cancel("s")
        prefill.blocks.check()
        assert prefill.blocks.all_free() and prefill.blocks.num_cached_blocks > 0
    finally:
        prefill.close()
        decode.close()


def test_a_decode_worker_keeps_a_turn_cached_and_prefills_the_next_turns_rest_itself(tiny):
    """Conditional disaggregation: turn 1 is prefilled on the prefill worker and decoded on the
    decode worker, which keeps its prompt's and answer's blocks cached; turns 2-4 are submitted
    to that decode worker, which finds every block of the previous turn but the one holding the
    answer's last token, computes only the rest, and answers as generate() does. A fifth turn
    with a long new part is prefilled on the prefill worker and only the blocks the decode
    worker lacks are transferred."""
    from decode_workers.decode_core import QUARANTINE_S, DecodeCore, DecodeOptions
    from engine.config import EngineConfig
    from prefill_workers.prefill_core import PrefillCore, PrefillOptions, PrefillTask

    config = EngineConfig(block_size=8, num_kv_blocks=128, max_num_batched_tokens=512, prefix_caching=True)
    prefill = PrefillCore(PrefillOptions(config, backend="shm"), tiny)
    decode = DecodeCore(DecodeOptions(config, backend="shm"), tiny)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    gen = torch.Generator().manual_seed(6)
    history = torch.randint(3, len(tiny.tokenizer), (29,), generator=gen).tolist()
    computed = []
    real_forward = decode.engine.runner.forward
    decode.engine.runner.forward = lambda batch, *a, **k: computed.append(
        sum(e.num_new_tokens for e in batch)
    ) or real_forward(batch, *a, **k)
    try:
        desc = decode.reserve("turn0", len(history))
        (result,) = prefill.run_batch([PrefillTask("turn0", tuple(history), greedy, desc, cache_salt="")])
        first = decode.activate("turn0", history, result.first_token, greedy)
        out, cached, previous = list(first.new_token_ids), 0, 0
        for turn in range(4):
            if turn:
                before = len(computed)
                decode.submit(f"turn{turn}", history, greedy)
                out = []
            while decode.has_work():
                for o in decode.step():
                    out += o.new_token_ids
                    cached = max(cached, o.cached_tokens)
            assert out == hf_greedy(tiny, history, 10), f"turn {turn}"
            if turn:
                assert cached == (previous - 1) // 8 * 8 > 0
                assert sum(computed[before:]) == len(history) - cached + len(out) - 1
            previous, cached = len(history) + len(out), 0
            history = history + out + torch.randint(3, len(tiny.tokenizer), (7,), generator=gen).tolist()
        assert decode.idle() and decode.engine.blocks.num_cached_blocks > 0
        decode.engine.blocks.check()

        # A long new part goes to the prefill worker (which holds only the earlier prompts): the
        # decode worker takes the blocks it holds from its cache and receives only the rest.
        history = history[: previous - 1] + torch.randint(3, len(tiny.tokenizer), (40,), generator=gen).tolist()
        held = (previous - 1) // 8
        desc = decode.reserve("long", len(history), prompt_token_ids=history)
        assert desc.meta.first_block == held and len(desc.meta.dst_block_ids) == -(-len(history) // 8) - held
        (result,) = prefill.run_batch([PrefillTask("long", tuple(history), greedy, desc, cache_salt="")])
        assert result.error is None
        out = list(decode.activate("long", history, result.first_token, greedy).new_token_ids)
        while decode.has_work():
            for o in decode.step():
                out += o.new_token_ids
        assert out == hf_greedy(tiny, history, 10)
        salted = decode.reserve("salted", len(history), prompt_token_ids=history, cache_salt="other")
        assert salted.meta.first_block == 0  # another salt's blocks are never taken
        decode.cancel("salted")
        # a prompt with images (the router says cache_salt None) leaves nothing cached behind
        other = torch.randint(3, len(tiny.tokenizer), (35,), generator=gen).tolist()
        before = decode.engine.blocks.num_cached_blocks
        desc = decode.reserve("image", len(other))
        (result,) = prefill.run_batch([PrefillTask("image", tuple(other), greedy, desc, cache_salt="")])
        decode.activate("image", other, result.first_token, greedy, cache_salt=None)
        while decode.has_work():
            decode.step()
        assert decode.engine.blocks.num_cached_blocks == before
        time.sleep(QUARANTINE_S)  # blocks of a transfer that never started wait out their quarantine
        assert decode.idle()
        decode.engine.blocks.check()
        prefill.blocks.check()
    finally:
        prefill.close()
        decode.close()


def test_blocks_holding_an_images_tokens_are_keyed_by_its_content():
    """Text blocks before the first image hash as without images; a block holding any placeholder
    of an image, and every block after it, depends on that image's content hash."""
    img = 9
    ids = list(range(100, 106)) + [img] * 4 + [50, 51] + [img] * 4 + list(range(60, 67))  # images at 6..10, 12..16
    a, b, c = (image_hash(bytes([n]) * 100) for n in (1, 2, 3))
    key = cache_key("", ids, img, [a, b])
    assert key.images == ((6, 10, a), (12, 16, b))
    plain = list(prefix_hashes(ids, BS))
    same = list(prefix_hashes(ids, BS, key))
    assert same[0] == plain[0] and all(x != y for x, y in zip(same[1:], plain[1:]))  # block 1 holds image a
    other_second = list(prefix_hashes(ids, BS, cache_key("", ids, img, [a, c])))
    # blocks 0..2 (positions 0..11) hold only text and image a; block 3 (12..15) holds image b
    assert other_second[:3] == same[:3] and all(x != y for x, y in zip(other_second[3:], same[3:]))
    assert list(prefix_hashes(ids, BS, cache_key("", ids, img, [a, b]))) == same  # deterministic
    m = BlockManager(16, BS, prefix_caching=True)
    table, _ = _computed(m, ids, key)
    m.free(table)
    assert len(m.match_prefix(ids, cache_key("", ids, img, [a, c]))[0]) == 3
    assert len(m.match_prefix(ids, cache_key("", ids, img, [c, b]))[0]) == 1
    for hashes, why in (([a], "8 image tokens do not make 1"), ([a, b, c], "8 image tokens do not make 3")):
        with pytest.raises(ValueError, match=why):
            cache_key("", ids, img, hashes)
    with pytest.raises(ValueError, match="unbroken"):
        cache_key("", [img, 1, img, img, 2, img], img, [a, b])
