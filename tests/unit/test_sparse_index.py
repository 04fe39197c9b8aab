"""Block index selection: FlexPrefill invariants, the static pattern, attention mass kept."""

import pytest
import torch

from engine.sparse import attention_mass_kept, causal_block_mask, flexprefill_index, static_index
from engine.sparse.synthetic import random_index

HQ, HKV, D = 6, 2, 16


def _qk(lk, off, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lk - off, HQ, D, generator=g), torch.randn(lk, HKV, D, generator=g)


@pytest.mark.parametrize("tau", [0.0, 1e9, 0.1])  # all vertical-slash, all query-aware, mixed
@pytest.mark.parametrize("lk,off,b", [(500, 0, 32), (461, 130, 32), (300, 0, 16)])
def test_flexprefill_invariants(lk, off, b, tau):
    q, k = _qk(lk, off)
    gamma, min_budget = 0.8, 3 * b
    res = flexprefill_index(q, k, off, D**-0.5, b, gamma, tau, min_budget)
    mask = res.index.to_mask()
    nqb, nkb = mask.shape[1:]
    causal = causal_block_mask(off, lk, b)
    absq = torch.arange(off // b, nkb)
    assert torch.equal(res.query_aware, res.js_distance < tau)
    if tau == 0.0:
        assert not res.query_aware.any()
    if tau == 1e9:
        assert res.query_aware.all()
    assert bool(mask[:, :, 0].all())  # sink
    assert bool(mask[:, torch.arange(nqb), absq].all())  # diagonal
    assert not bool((mask & ~causal).any())
    need = torch.clamp(causal.sum(-1), max=3)  # min budget, capped
    assert bool((res.index.counts >= need).all())
    assert bool((res.estimated_mass >= gamma - 1e-5).all())


@pytest.mark.parametrize("tau", [0.0, 1e9, 0.1])
def test_flexprefill_head_chunking_gives_the_same_index(monkeypatch, tau):
    # The last block's attention is computed per chunk of whole GQA groups; chunk size must not
    # change the result (one group per chunk here vs all heads in one).
    import engine.sparse.flexprefill as fp

    lk, off, b = 461, 130, 32
    q, k = _qk(lk, off, seed=4)
    whole = flexprefill_index(q, k, off, D**-0.5, b, 0.8, tau, 3 * b)
    monkeypatch.setattr(fp, "_MAX_LAST_BLOCK_ELEMS", 1)
    chunked = flexprefill_index(q, k, off, D**-0.5, b, 0.8, tau, 3 * b)
    assert torch.equal(whole.index.to_mask(), chunked.index.to_mask())
    torch.testing.assert_close(whole.js_distance, chunked.js_distance)
    torch.testing.assert_close(whole.estimated_mass, chunked.estimated_mass)


def test_flexprefill_estimated_mass_recomputed():
    lk, off, b, gamma = 400, 0, 32, 0.7
    q, k = _qk(lk, off, seed=1)
    scale = D**-0.5
    # Query-aware: pooled-q x pooled-k block estimate, rows normalised, kept share >= gamma.
    res = flexprefill_index(q, k, off, scale, b, gamma, 1e9, 0)
    nkb = -(-lk // b)
    pad_q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, nkb * b - lk))
    pad_k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, nkb * b - lk))
    n = torch.clamp(lk - torch.arange(nkb) * b, max=b).float()
    qp = pad_q.view(nkb, b, HQ, D).sum(1) / n[:, None, None]  # [NQB, Hq, D]
    kp = (pad_k.view(nkb, b, HKV, D).sum(1) / n[:, None, None]).repeat_interleave(HQ // HKV, 1)
    est = torch.einsum("qhd,khd->hqk", qp, kp) * scale
    est = est.masked_fill(~causal_block_mask(off, lk, b), float("-inf")).softmax(-1)
    kept = (est * res.index.to_mask()).sum((1, 2)) / nkb
    assert bool((kept >= gamma - 1e-5).all())
    # Vertical-slash: the last query block's true attention inside its kept blocks >= gamma.
    res = flexprefill_index(q, k, off, scale, b, gamma, 0.0, 0)
    rows = torch.arange((nkb - 1) * b, lk)
    kk = k.repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("rhd,khd->hrk", q[rows - off], kk) * scale
    a = s.masked_fill(torch.arange(lk) > rows[:, None], float("-inf")).softmax(-1)
    keep = res.index.to_mask()[:, -1].repeat_interleave(b, -1)[:, :lk]
    assert bool(((a * keep[:, None]).sum(-1).mean(-1) >= gamma - 1e-5).all())


def test_flexprefill_vertical_slash_finds_heavy_columns():
    lk, b = 512, 32
    q, k = _qk(lk, 0, seed=2)
    q[:] = q[:] * 0.1 + 1.0
    k[100] = 8.0  # every query attends key 100 heavily (a vertical line)
    res = flexprefill_index(q, k, 0, D**-0.5, b, 0.5, 0.0, 0)
    mask = res.index.to_mask()
    later = torch.arange(100 // b, lk // b)  # query blocks that can see 100
    assert bool(mask[:, later, 100 // b].all())


def test_static_pattern_structure():
    lk, off, b, sink, local = 1000, 300, 16, 2, 3
    mask = static_index(4, off, lk, b, sink, local).to_mask()
    nkb = -(-lk // b)
    for j, a in enumerate(range(off // b, nkb)):
        for kb in range(nkb):
            dist = a - kb
            want = dist >= 0 and (kb < sink or dist < local or (dist & (dist - 1)) == 0)
            assert bool(mask[0, j, kb]) == want, (a, kb)
    assert bool((mask == mask[:1]).all())  # same for every head


def test_attention_mass_kept():
    lk, off, b = 200, 37, 16
    q, k = _qk(lk, off, seed=4)
    full = random_index(HQ, off, lk, b, 1.0)
    mean, p10, per_head = attention_mass_kept(q, k, full, D**-0.5, rows_per_chunk=50)
    assert mean == pytest.approx(1.0, abs=1e-5) and p10 == pytest.approx(1.0, abs=1e-5)
    sparse = random_index(HQ, off, lk, b, 0.3, torch.Generator().manual_seed(0))
    mean, p10, per_head = attention_mass_kept(q, k, sparse, D**-0.5, rows_per_chunk=50)
    kk = k.repeat_interleave(HQ // HKV, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * D**-0.5
    pos = torch.arange(off, lk)
    p = s.masked_fill(torch.arange(lk) > pos[:, None], float("-inf")).softmax(-1)
    want = (p * sparse.token_mask()).sum(-1).mean(-1)
    torch.testing.assert_close(per_head, want, atol=1e-5, rtol=1e-5)
    assert p10 <= mean < 1.0
