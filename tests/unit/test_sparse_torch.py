"""The torch block-sparse path, the block index and the entry point against dense references."""

import pytest
import torch

from engine.sparse import BlockIndex, SparseMethod, SparsePrefillConfig, num_query_blocks, sparse_prefill_attention
from engine.sparse.dense import dense_causal_attention
from engine.sparse.reference import reference_attention
from engine.sparse.synthetic import random_index
from engine.sparse.torch_impl import block_sparse_attention_torch

# (Lk, q_offset, Hq, Hkv, D, B): ragged lengths, GQA, offsets inside and on block boundaries.
CASES = [
    (200, 0, 4, 2, 16, 16),
    (203, 77, 6, 2, 32, 16),
    (130, 5, 3, 3, 16, 32),
    (257, 64, 9, 3, 32, 64),
    (100, 99, 2, 1, 16, 16),  # a single query row (decode-like chunk)
]


def _qkv(lk, off, hq, hkv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(lk - off, hq, d, generator=g).to(dtype)
    k = torch.randn(lk, hkv, d, generator=g).to(dtype)
    v = torch.randn(lk, hkv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("lk,off,hq,hkv,d,b", CASES)
def test_torch_matches_reference(lk, off, hq, hkv, d, b, dtype, tol):
    q, k, v = _qkv(lk, off, hq, hkv, d, dtype)
    index = random_index(hq, off, lk, b, 0.4, torch.Generator().manual_seed(1))
    ref = reference_attention(q, k, v, index, d**-0.5)
    out = block_sparse_attention_torch(q, k, v, index, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_empty_rows_and_missing_diagonal_give_reference():
    lk, off, hq, hkv, d, b = 96, 16, 2, 1, 16, 16
    q, k, v = _qkv(lk, off, hq, hkv, d, torch.float32)
    mask = torch.zeros(hq, num_query_blocks(off, lk, b), lk // b, dtype=torch.bool)
    mask[0, 2, 0] = True  # head 0: one far block for query block 2 only
    mask[1, :, 1] = True  # head 1: block 1 everywhere (no diagonal for later blocks)
    index = BlockIndex.from_mask(mask, b, off, lk)
    out = block_sparse_attention_torch(q, k, v, index, 0.25)
    ref = reference_attention(q, k, v, index, 0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[:16, 0].abs().max() == 0  # rows with nothing to attend are 0


@pytest.mark.parametrize("lk,off,hq,hkv,d,b", CASES)
def test_full_index_equals_dense_causal(lk, off, hq, hkv, d, b):
    q, k, v = _qkv(lk, off, hq, hkv, d, torch.float32, seed=3)
    index = random_index(hq, off, lk, b, 1.0)
    assert index.density() == 1.0
    dense = dense_causal_attention(q, k, v, off, d**-0.5)
    out = block_sparse_attention_torch(q, k, v, index, d**-0.5)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_block_index_roundtrip_and_causality():
    lk, off, b = 203, 77, 16
    nqb = num_query_blocks(off, lk, b)
    mask = torch.rand(3, nqb, -(-lk // b), generator=torch.Generator().manual_seed(0)) < 0.5
    index = BlockIndex.from_mask(mask, b, off, lk)
    absq = torch.arange(off // b, off // b + nqb)
    causal = torch.arange(mask.shape[-1])[None, :] <= absq[:, None]
    assert torch.equal(index.to_mask(), mask & causal)
    valid = torch.arange(index.block_ids.shape[-1]) < index.counts[..., None]
    ids = index.block_ids
    assert bool(((ids[..., 1:] > ids[..., :-1]) | ~valid[..., 1:]).all())  # ascending
    assert bool(((ids <= absq[None, :, None]) | ~valid).all())  # causal


def test_entry_point_dense_below_and_methods():
    lk, off, hq, hkv, d = 300, 40, 6, 2, 32
    q, k, v = _qkv(lk, off, hq, hkv, d, torch.float32)
    dense = dense_causal_attention(q, k, v, off, d**-0.5)
    out, stats = sparse_prefill_attention(q, k, v, off, d**-0.5, SparsePrefillConfig(block_size=16, dense_below=301))
    assert stats.method is SparseMethod.DENSE and stats.density == 1.0
    torch.testing.assert_close(out, dense)
    for method in ("static", "flexprefill"):
        cfg = SparsePrefillConfig(method=method, block_size=16, dense_below=0, min_budget=32)
        out, stats = sparse_prefill_attention(q, k, v, off, d**-0.5, cfg)
        assert stats.backend == "torch" and 0 < stats.density <= 1 and len(stats.patterns) == hq
        assert out.shape == q.shape and torch.isfinite(out).all()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="method"):
        SparsePrefillConfig(method="magic")
    with pytest.raises(ValueError, match="block_size"):
        SparsePrefillConfig(block_size=48)
    with pytest.raises(ValueError, match="gamma"):
        SparsePrefillConfig(gamma=0.0)
