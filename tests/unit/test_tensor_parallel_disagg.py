"""Disaggregated serving between pools of different tensor parallelism, on real gloo ranks: the tiny
seeded Llama (4 heads, 2 KV heads), prefill TP2 -> decode TP1 over shared memory and prefill TP1 ->
decode TP2 over shared memory and over the gloo transport (each decode rank its own receiver, as
across nodes), gives greedy output token-identical to transformers generate() for 8 prompts of
different lengths prefilled in one batch; every rank's KV heads land in the decode rank that holds
them, and nothing stays held on either side."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp

import pytest
import torch

from decode_workers.decode_core import DecodeCore, DecodeOptions, decode_follower
from engine.config import EngineConfig
from engine.sequence import SamplingParams
from engine.tensor_parallel import TPGroup, run_local_group
from kv_transfer.segment import list_segments, orphaned_segments
from prefill_workers.prefill_core import PrefillCore, PrefillOptions, PrefillTask, prefill_follower
from tests.helpers.models import hf_greedy
from tests.helpers.tp import tiny_loaded

LENGTHS = [3, 9, 17, 30, 47, 64, 100, 161]
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


def _config(tp: int, **kw) -> EngineConfig:
    return EngineConfig(
        block_size=8, num_kv_blocks=128, max_num_batched_tokens=512, max_num_seqs=8, tensor_parallel=tp, **kw
    )


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def _prefill(core: PrefillCore, prompts, descriptors, one_at_a_time: bool = False) -> tuple[list[int], list[int]]:
    """(first token, cached tokens) per prompt: all in one batch, or one batch each so that later
    prompts find the blocks of earlier ones in the prefix cache."""
    tasks = [PrefillTask(f"r{i}", tuple(p), GREEDY, d) for i, (p, d) in enumerate(zip(prompts, descriptors))]
    results = [r for batch in ([[t] for t in tasks] if one_at_a_time else [tasks]) for r in core.run_batch(batch)]
    assert all(r.error is None for r in results), [r.error for r in results]
    assert core.blocks.all_free()
    return [r.first_token for r in results], [r.cached_tokens for r in results]


def _decode(core: DecodeCore, prompts, first_tokens) -> dict[str, list[int]]:
    out = {}
    for i, (p, t) in enumerate(zip(prompts, first_tokens)):
        out[f"r{i}"] = list(core.activate(f"r{i}", p, t, GREEDY).new_token_ids)
    while core.has_work():
        for o in core.step():
            out[o.request_id] += o.new_token_ids
    assert core.idle() and core.engine.blocks.all_free()
    return out


def _prefill_rank(tp: TPGroup, prompts, descriptors, caching: bool = False, backend: str = "shm"):
    """A prefill group's rank: rank 0 returns (first tokens, cached tokens, its layout). With
    prefix caching the prompts go one batch at a time (_prefill), and every rank's cache holds its
    heads of the blocks later prompts reuse."""
    options = PrefillOptions(_config(tp.size, prefix_caching=caching), backend=backend)
    if not tp.is_driver:
        return prefill_follower(options, tiny_loaded(), tp)
    core = PrefillCore(options, tiny_loaded(), tp=tp)
    try:
        return *_prefill(core, prompts, descriptors, one_at_a_time=caching), core.runner.layout
    finally:
        core.close()


# The gloo transport runs here where the receiving side is a group (each decode rank its own
# receiver); several senders over gloo are covered by tests/unit/test_kv_transfer_tp.py (the
# model-level run costs the suite ~12 s; it passes with "gloo" added below).
BACKENDS = pytest.mark.parametrize("backend", ["shm", "gloo"])


@pytest.mark.parametrize("backend", ["shm"])
def test_prefill_tp2_to_decode_tp1_is_token_identical_to_transformers(backend):
    loaded = tiny_loaded()
    prompts = _prompts(len(loaded.tokenizer))
    reference = [hf_greedy(loaded, p, NEW_TOKENS) for p in prompts]
    core = DecodeCore(DecodeOptions(_config(1), backend=backend, senders=2), loaded)
    try:
        descriptors = [core.reserve(f"r{i}", len(p)) for i, p in enumerate(prompts)]
        first, _, prefill_layout = run_local_group(_prefill_rank, 2, prompts, descriptors, False, backend)
        assert (prefill_layout.kv_head_start, prefill_layout.num_kv_heads) == (0, 1)  # rank 0 holds head 0 of 2
        got = _decode(core, prompts, first)
    finally:
        core.close()
    for i, (n, ref) in enumerate(zip(LENGTHS, reference)):
        assert got[f"r{i}"] == ref, f"prompt of {n} tokens: prefill TP2 -> decode TP1 {got[f'r{i}']} != {ref}"
    assert not list_segments()


def _decode_rank(tp: TPGroup, prompts, to_parent, from_parent, backend):
    options = DecodeOptions(_config(tp.size), backend=backend, senders=1)
    if not tp.is_driver:
        return decode_follower(options, tiny_loaded(), tp)
    core = DecodeCore(options, tiny_loaded(), tp=tp)
    try:
        to_parent.put([core.reserve(f"r{i}", len(p)) for i, p in enumerate(prompts)])
        first = from_parent.get(timeout=120)
        return _decode(core, prompts, first), core.engine.layout
    finally:
        core.close()


@BACKENDS
def test_prefill_tp1_to_decode_tp2_is_token_identical_to_transformers(backend):
    loaded = tiny_loaded()
    prompts = _prompts(len(loaded.tokenizer))
    reference = [hf_greedy(loaded, p, NEW_TOKENS) for p in prompts]
    ctx = mp.get_context("spawn")
    to_parent, from_parent = ctx.Queue(), ctx.Queue()
    with cf.ThreadPoolExecutor(1) as pool:
        group = pool.submit(run_local_group, _decode_rank, 2, prompts, to_parent, from_parent, backend)
        descriptors = to_parent.get(timeout=300)
        prefill = PrefillCore(PrefillOptions(_config(1), backend=backend), loaded)
        try:
            from_parent.put(_prefill(prefill, prompts, descriptors)[0])
        finally:
            prefill.close()
        got, decode_layout = group.result(timeout=300)
    assert (decode_layout.kv_head_start, decode_layout.num_kv_heads) == (0, 1)  # rank 0 holds head 0 of 2
    assert not orphaned_segments()  # each decode rank let go of its cache segment when it stopped
    assert not list_segments()
    for i, (n, ref) in enumerate(zip(LENGTHS, reference)):
        assert got[f"r{i}"] == ref, f"prompt of {n} tokens: prefill TP1 -> decode TP2 {got[f'r{i}']} != {ref}"


def test_prefill_tp2_with_a_prefix_cache_reuses_every_ranks_blocks():
    loaded = tiny_loaded()
    gen = torch.Generator().manual_seed(13)
    shared = torch.randint(3, len(loaded.tokenizer), (29,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, len(loaded.tokenizer), (n,), generator=gen).tolist() for n in (5, 12, 20)]
    reference = [hf_greedy(loaded, p, NEW_TOKENS) for p in prompts]
    core = DecodeCore(DecodeOptions(_config(1), backend="shm", senders=2), loaded)
    try:
        descriptors = [core.reserve(f"r{i}", len(p)) for i, p in enumerate(prompts)]
        first, cached, _ = run_local_group(_prefill_rank, 2, prompts, descriptors, True)
        assert cached == [0, 24, 24]  # the shared 29 tokens' 3 full blocks of 8
        got = _decode(core, prompts, first)
    finally:
        core.close()
    assert [got[f"r{i}"] for i in range(3)] == reference
