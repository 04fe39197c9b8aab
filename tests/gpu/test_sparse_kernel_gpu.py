"""The Triton block-sparse kernel on CUDA (bf16/fp16) against SDPA and the masked reference.
No Ray; skipped cleanly without CUDA."""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from engine.sparse import SparsePrefillConfig, sparse_prefill_attention  # noqa: E402
from engine.sparse.dense import dense_causal_attention  # noqa: E402
from engine.sparse.reference import reference_attention  # noqa: E402
from engine.sparse.synthetic import random_index  # noqa: E402
from engine.sparse.triton_kernel import block_sparse_attention_triton  # noqa: E402

DTYPES = {"bf16": (torch.bfloat16, 2e-2), "fp16": (torch.float16, 4e-3)}


def _qkv(lk, off, hq, hkv, d, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n, h: torch.randn(n, h, d, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(lk - off, hq), mk(lk, hkv), mk(lk, hkv)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize(
    "lk,off,hq,hkv,d,b", [(4096, 0, 32, 8, 128, 128), (3001, 1234, 9, 3, 64, 64), (2048, 0, 8, 8, 64, 128)]
)
def test_full_index_matches_sdpa(lk, off, hq, hkv, d, b, dname):
    dtype, tol = DTYPES[dname]
    q, k, v = _qkv(lk, off, hq, hkv, d, dtype)
    index = random_index(hq, off, lk, b, 1.0, device="cuda")
    out = block_sparse_attention_triton(q, k, v, index, d**-0.5)
    dense = dense_causal_attention(q, k, v, off, d**-0.5)
    torch.testing.assert_close(out.float(), dense.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize(
    "lk,off,hq,hkv,d,b,bm,bn",
    [(1000, 0, 8, 2, 128, 128, 128, 64), (777, 300, 6, 2, 64, 64, 64, 32), (1025, 17, 4, 1, 96, 64, 32, 64)],
)
def test_sparse_matches_reference(lk, off, hq, hkv, d, b, bm, bn, dname):
    dtype, tol = DTYPES[dname]
    q, k, v = _qkv(lk, off, hq, hkv, d, dtype, seed=1)
    index = random_index(hq, off, lk, b, 0.3, torch.Generator().manual_seed(3), device="cuda")
    out = block_sparse_attention_triton(q, k, v, index, d**-0.5, block_m=bm, block_n=bn)
    ref = reference_attention(q, k, v, index, d**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_fp32_and_entry_point_on_cuda():
    q, k, v = _qkv(2000, 500, 9, 3, 64, torch.float32, seed=2)
    index = random_index(9, 500, 2000, 64, 0.4, torch.Generator().manual_seed(4), device="cuda")
    out = block_sparse_attention_triton(q, k, v, index, 0.125)
    torch.testing.assert_close(out, reference_attention(q, k, v, index, 0.125), atol=1e-4, rtol=1e-4)
    cfg = SparsePrefillConfig(method="flexprefill", block_size=64, dense_below=0)
    out, stats = sparse_prefill_attention(q, k, v, 500, 0.125, cfg)
    assert stats.backend == "triton" and out.shape == q.shape and torch.isfinite(out).all()
