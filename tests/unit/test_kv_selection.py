"""Decode-side KV selection (engine/kv_select): what each method keeps, that a selected row
attends exactly over its kept blocks, and an engine with selection on (greedy parity where the
budget holds everything, leak checks, aborts, re-scoring)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine import attention
from engine.kv_layout import KVLayout
from engine.kv_select.config import KVSelectionConfig, KVSelectionConfigError
from engine.kv_select.selector import KVSelector, QuestRow, Shape, block_mass, quest_pick
from engine.sequence import SamplingParams

BS, HKV, HQ, D = 4, 2, 4, 8


def _layout(layers=2):
    return KVLayout("t", "float32", layers, HKV, D, BS)


def _entry(rid, prompt_len, ctx, table):
    """A decode row of a sequence with `ctx` tokens (the last one being decoded now)."""
    seq = SimpleNamespace(request_id=rid, num_prompt_tokens=prompt_len, num_computed_tokens=ctx - 1, block_table=table)
    return SimpleNamespace(seq=seq, num_new_tokens=1)


def _reference(q, k_tokens, v_tokens, keep_positions, scale):
    """Attention of one query [Hq, D] over the given positions of a logical token stream."""
    k = k_tokens[keep_positions].transpose(0, 1).repeat_interleave(HQ // HKV, 0)  # [Hq, n, D]
    v = v_tokens[keep_positions].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
    p = torch.softmax((k @ q[:, :, None]).squeeze(-1) * scale, dim=-1)
    return (p[:, None, :] @ v).squeeze(1)


@pytest.mark.parametrize("ctx", [70, 72, 73])  # the current block partly filled, full, just started
def test_a_selected_row_attends_exactly_over_its_kept_blocks(ctx):
    """streaming at budget 0.5 over a shuffled block table: sink block 0, the widened window and
    the current block, per layer; the hook's output equals attention over exactly those tokens."""
    torch.manual_seed(0)
    cfg = KVSelectionConfig(method="streaming", budget=0.5, sink=1, window=2, dense_below=0)
    layers, blocks = 2, 40
    sel = KVSelector(cfg, _layout(layers), blocks, "cpu")
    n = -(-ctx // BS)
    table = torch.randperm(blocks)[:n].tolist()
    kv = torch.randn(layers, 2, blocks, BS, HKV, D)
    plan = sel.plan([_entry("a", 60, ctx, table)])
    assert plan is not None and plan.selected is not None
    tail = min(n - cfg.window, 60 // BS)
    keep = math.ceil(0.5 * n) - 1 - (n - tail)
    kept = [0, *range(tail - keep, tail), *range(tail, n)]
    positions = torch.tensor([b * BS + i for b in kept for i in range(BS) if b * BS + i < ctx])
    q = torch.randn(1, HQ, D)
    for layer in range(layers):
        out = torch.zeros_like(q)
        attention._selection(plan, layer, q, kv[layer, 0], kv[layer, 1], out, D**-0.5)
        k_tokens = kv[layer, 0][table].reshape(-1, HKV, D)
        v_tokens = kv[layer, 1][table].reshape(-1, HKV, D)
        ref = _reference(q[0], k_tokens, v_tokens, positions, D**-0.5)
        torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    assert sel.stats.rows == 1 and sel.stats.density == pytest.approx(len(kept) / n)


def test_block_mass_is_the_attention_of_the_recent_queries_per_block():
    torch.manual_seed(1)
    ctx, n = 22, 6
    k = torch.randn(n * BS, HKV, D)
    q = torch.randn(3, HQ, D)
    mass = block_mass(q, k, ctx, BS, 0.5)
    ref = torch.zeros(n)
    for r in range(3):
        for h in range(HQ):
            p = torch.softmax(k[:ctx, h // (HQ // HKV)] @ q[r, h] * 0.5, dim=0)
            ref += torch.nn.functional.pad(p, (0, n * BS - ctx)).view(n, BS).sum(1)
    torch.testing.assert_close(mass, ref, atol=1e-5, rtol=1e-5)
    assert mass.sum() == pytest.approx(3 * HQ, rel=1e-5)


def test_loopserve_keeps_the_fewest_blocks_covering_gamma_within_its_budgets():
    """Per layer: layer 0's mass sits on two middle blocks (gamma is covered by them; each comes
    with the block after it), layer 1's is spread evenly (the budget caps it); min_budget is a
    floor; snapkv keeps the budget's count by mass alone."""
    cfg = KVSelectionConfig(method="loopserve", budget=0.5, min_budget=0.0, gamma=0.9, sink=1, window=2)
    sel = KVSelector(cfg, _layout(), 64, "cpu")
    n, tail, keep = 20, 18, 7  # 1 sink + 7 middle + 2 tail = 10 = 0.5 * 20
    mass = torch.full((2, n), 1.0)
    mass[0] = 0.01
    mass[0, 5], mass[0, 11] = 50.0, 40.0
    middle = sel._choose(mass, Shape(n, 1, tail, keep))
    assert sorted(x for x in middle[0].tolist() if x >= 0) == [5, 6, 11, 12]
    assert (middle[1] >= 0).sum() == keep
    floor = KVSelector(
        KVSelectionConfig(method="loopserve", budget=0.5, min_budget=0.4, sink=1, window=2), _layout(), 64, "cpu"
    )
    kept = [x for x in floor._choose(mass, Shape(n, 1, tail, keep))[0].tolist() if x >= 0]
    assert {5, 6, 11, 12} <= set(kept) and math.ceil(0.4 * n) - 1 - 2 <= len(kept) <= keep
    snap = KVSelector(KVSelectionConfig(method="snapkv", budget=0.5, sink=1, window=2), _layout(), 64, "cpu")
    assert {5, 11} <= set(snap._choose(mass, Shape(n, 1, tail, keep))[0].tolist()) and (
        snap._choose(mass, Shape(n, 1, tail, keep)) >= 0
    ).all()


def test_quest_keeps_the_block_whose_keys_bound_the_score_highest():
    torch.manual_seed(2)
    blocks = torch.arange(10)
    bounds = torch.zeros(10, 2, HKV, D)
    bounds[:, 0], bounds[:, 1] = -0.1, 0.1
    q = torch.randn(HQ, D)
    bounds[6, 1] = q.view(HKV, -1, D).sum(1).clamp(min=0) * 5  # keys near q's direction in block 6
    bounds[6, 0] = q.view(HKV, -1, D).sum(1).clamp(max=0) * 5
    kept, length = quest_pick(q, bounds, QuestRow(0, blocks, 38, Shape(10, sink=1, tail=8, keep=1)), BS)
    assert kept.tolist() == [0, 6, 8, 9] and length == 3 * BS + 2


def test_config_refuses_what_it_cannot_do():
    for field, kw in [
        ("method", {"method": "h2o"}),
        ("budget", {"budget": 0.0}),
        ("budget", {"budget": float("nan")}),
        ("min_budget", {"min_budget": 0.6, "budget": 0.5}),
        ("gamma", {"gamma": 1.5}),
        ("window", {"window": 0}),
        ("rescore_every", {"rescore_every": 10**6}),
        ("sink", {"sink": True}),
    ]:
        with pytest.raises(KVSelectionConfigError, match=f"KVSelectionConfig.{field}"):
            KVSelectionConfig(**kw)


LONG = [list(range(300 + 7 * i, 300 + 7 * i + 150 + 20 * i)) for i in range(3)]  # 150, 170, 190 tokens


def _engine(make_engine, tiny, **selection):
    cfg = None if not selection else KVSelectionConfig(**selection)
    return make_engine(tiny, block_size=8, num_kv_blocks=256, max_num_batched_tokens=64, kv_selection=cfg)


def test_a_budget_that_holds_every_block_decodes_as_dense(make_engine, tiny):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    dense = [o.token_ids for o in _engine(make_engine, tiny).generate(LONG, params)]
    full = _engine(make_engine, tiny, method="loopserve", budget=1.0, dense_below=0, rescore_every=4)
    assert [o.token_ids for o in full.generate(LONG, params)] == dense
    assert full.selector.stats.rows == 0  # nothing to leave out: every row attended densely


@pytest.mark.parametrize("method", ["loopserve", "snapkv", "streaming", "quest"])
def test_each_method_keeps_at_most_its_budget_and_leaves_nothing_behind(make_engine, tiny, method):
    """Half the blocks (plus the current turn's output): the density stays at or under the budget
    plus the output's share; loopserve re-scores every R tokens, snapkv once; an abort mid-way
    and the finished sequences leave no block and no selection state (make_engine checks blocks)."""
    engine = _engine(make_engine, tiny, method=method, budget=0.5, dense_below=64, rescore_every=4, window=2)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    rids = [engine.add_request(p, params) for p in LONG]
    for _ in range(20):  # every prompt prefilled (8 steps of 64 tokens) and decoding
        engine.step()
    assert engine.abort(rids[0])
    while engine.has_unfinished():
        engine.step()
    s = engine.selector.stats
    assert s.rows > 0 and 0.1 < s.density <= 0.5 + 20 / 150
    if method == "loopserve":  # from the prompt's last queries, then every 4 tokens
        assert s.rescores >= 2 * (1 + 19 // 4)
    elif method == "snapkv":
        assert s.rescores == 3
    else:
        assert s.rescores == 0
    assert not engine.selector._states


def test_selection_refuses_tensor_parallel():
    from engine.config import EngineConfig
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="kv_selection .loopserve. runs on one rank only"):
        EngineConfig(tensor_parallel=2, kv_selection=KVSelectionConfig(method="loopserve"))


@pytest.mark.parametrize("method", ["loopserve", "quest"])
def test_a_decode_worker_selects_over_kv_a_prefill_worker_wrote(tiny, method):
    """Disaggregated: the prompt's KV lands from a prefill worker (dense), then the decode
    worker's engine selects: at a budget holding every block its output is transformers'; at
    half, loopserve selects after R decode steps (it saw no prompt queries), quest from the
    key bounds of the landed blocks; the decode worker's blocks are all free after."""
    from decode_workers.decode_core import DecodeCore, DecodeOptions
    from engine.config import EngineConfig
    from prefill_workers.prefill_core import PrefillCore, PrefillOptions, PrefillTask
    from tests.helpers.models import hf_greedy

    prefill = PrefillCore(PrefillOptions(EngineConfig(block_size=8, num_kv_blocks=128), backend="shm"), tiny)
    greedy = SamplingParams(max_tokens=16, ignore_eos=True)
    try:
        for budget in (1.0, 0.5):
            selection = KVSelectionConfig(method=method, budget=budget, dense_below=64, rescore_every=4, window=2)
            config = EngineConfig(block_size=8, num_kv_blocks=128, kv_selection=selection)
            decode = DecodeCore(DecodeOptions(config, backend="shm"), tiny)
            try:
                outs = []
                for i, p in enumerate(LONG):
                    desc = decode.reserve(f"p{i}", len(p))
                    (result,) = prefill.run_batch([PrefillTask(f"p{i}", tuple(p), greedy, desc)])
                    outs.append(list(decode.activate(f"p{i}", p, result.first_token, greedy).new_token_ids))
                while decode.has_work():
                    for o in decode.step():
                        outs[int(o.request_id[1:])] += o.new_token_ids
                stats = decode.engine.selector.stats
                if budget == 1.0:
                    assert outs == [hf_greedy(tiny, p, 16) for p in LONG] and stats.rows == 0
                else:
                    assert stats.rows > 0 and stats.density <= 0.5 + 16 / 150
                    if method == "loopserve":  # after 3 decode queries, then every 4
                        assert stats.rescores == 3 * len(range(4, 16, 4))
                assert decode.engine.blocks.all_free() and not decode.engine.selector._states
            finally:
                decode.close()
    finally:
        prefill.close()


def test_preempted_sequences_recompute_and_select_again(make_engine, tiny):
    """A pool too small for the three sequences at once: the scheduler preempts and recomputes;
    with a budget holding every block the output is still dense's, and at half every sequence
    finishes with nothing left behind (make_engine checks the blocks)."""
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    small = dict(block_size=8, num_kv_blocks=60, max_num_batched_tokens=64)
    dense = [o.token_ids for o in make_engine(tiny, **small).generate(LONG, params)]
    for budget in (1.0, 0.5):
        selection = KVSelectionConfig(method="loopserve", budget=budget, dense_below=64, rescore_every=4)
        engine = make_engine(tiny, **small, kv_selection=selection)
        out = [o.token_ids for o in engine.generate(LONG, params)]
        assert engine.scheduler.num_preemptions > 0
        assert (out == dense) if budget == 1.0 else all(len(o) == 20 for o in out)
        assert not engine.selector._states


def test_a_new_turn_over_a_cached_history_is_prefilled_sparsely(make_engine, tiny, monkeypatch):
    """With prefix caching and FlexPrefill (what a decode pool's `sparse:` gives its local
    prefills), the next turn's chunk attends to the cached history through the sparse path
    (q_offset = the history it did not recompute), keeping part of the blocks."""
    import engine.sparse as sparse
    from engine.sparse import SparsePrefillConfig

    calls = []
    real = sparse.sparse_prefill_attention

    def recording(q, k, v, q_offset, scale, config):
        out, stats = real(q, k, v, q_offset, scale, config)
        calls.append((q.shape[0], q_offset, stats.density))
        return out, stats

    monkeypatch.setattr(sparse, "sparse_prefill_attention", recording, raising=False)
    flex = SparsePrefillConfig(method="flexprefill", block_size=16, min_budget=16, dense_below=0, gamma=0.5)
    engine = make_engine(
        tiny, block_size=8, num_kv_blocks=256, max_num_batched_tokens=512, prefix_caching=True, sparse=flex
    )
    history = LONG[2] * 2  # 380 tokens
    engine.generate([history], SamplingParams(max_tokens=1))
    calls.clear()
    turn = history + list(range(500, 540))
    engine.generate([turn], SamplingParams(max_tokens=1))
    new = [(lq, off, density) for lq, off, density in calls if off > 0]
    assert new and all(off >= 376 and lq <= 48 for lq, off, _ in new)  # only the new turn was computed
    assert min(density for _, _, density in new) < 1.0
