"""The Triton block-sparse kernel under TRITON_INTERPRET=1 (fp32, fp16; bf16 is wrong in the
interpreter) against the dense masked reference.

TRITON_INTERPRET must be set before Triton is first imported, and the test session may already
have imported it (transformers does), so all kernel calls run once in a subprocess that writes
outputs and references to a file; the tests here compare them. Shapes stay tiny: the interpreter
is slow.
"""

import pytest
import torch

from tests.helpers.triton_interpret import run_interpreted

pytest.importorskip("triton")


# id -> (Lk, q_offset, Hq, Hkv, D, B, BLOCK_M, BLOCK_N, density, dtype)
CASES = {
    "ragged-gqa": (100, 0, 2, 1, 16, 16, 16, 16, 0.5),
    "offset-in-block-subtiles": (150, 53, 3, 1, 32, 32, 16, 16, 0.5),
    "d24-offset-on-boundary": (96, 32, 2, 2, 24, 32, 32, 16, 0.5),
    "full-index": (80, 20, 2, 1, 16, 16, 16, 16, 1.0),
}
DTYPES = {"fp32": (torch.float32, 1e-4), "fp16": (torch.float16, 2e-3)}


def _run_cases(path: str) -> None:
    """Subprocess body: every case x dtype through the interpreted kernel and the references."""
    from triton import knobs

    from engine.sparse import BlockIndex, num_query_blocks
    from engine.sparse.dense import dense_causal_attention
    from engine.sparse.reference import reference_attention
    from engine.sparse.synthetic import random_index
    from engine.sparse.triton_kernel import block_sparse_attention_triton

    assert knobs.runtime.interpret, "TRITON_INTERPRET=1 did not take effect"
    results = {}
    for name, (lk, off, hq, hkv, d, b, bm, bn, density) in CASES.items():
        for dname, (dtype, _) in DTYPES.items():
            g = torch.Generator().manual_seed(0)
            q = torch.randn(lk - off, hq, d, generator=g).to(dtype)
            k = torch.randn(lk, hkv, d, generator=g).to(dtype)
            v = torch.randn(lk, hkv, d, generator=g).to(dtype)
            index = random_index(hq, off, lk, b, density, torch.Generator().manual_seed(2))
            out = block_sparse_attention_triton(q, k, v, index, d**-0.5, bm, bn)
            ref = reference_attention(q, k, v, index, d**-0.5)
            dense = dense_causal_attention(q.float(), k.float(), v.float(), off, d**-0.5)
            results[f"{name}-{dname}"] = (out, ref, dense)
    # Strided q/k/v views of one fused projection, and rows with nothing to attend.
    lk, hq, hkv, b = 64, 2, 1, 16
    qkv = torch.randn(lk, hq + 2 * hkv, 16, generator=torch.Generator().manual_seed(3))
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]
    mask = torch.zeros(hq, num_query_blocks(0, lk, b), lk // b, dtype=torch.bool)
    mask[0, 3, 0] = True
    mask[1, :, 0] = True
    index = BlockIndex.from_mask(mask, b, 0, lk)
    results["strided-empty-rows"] = (
        block_sparse_attention_triton(q, k, v, index, 0.25),
        reference_attention(q, k, v, index, 0.25),
        None,
    )
    torch.save(results, path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_interpreted(
        "tests.unit.test_sparse_triton", tmp_path_factory.mktemp("sparse_triton") / "results.pt", 300
    )


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(results, name, dname):
    dtype, tol = DTYPES[dname]
    out, ref, _ = results[f"{name}-{dname}"]
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_kernel_full_index_equals_dense_causal(results, dname):
    _, tol = DTYPES[dname]
    out, _, dense = results[f"full-index-{dname}"]
    torch.testing.assert_close(out.float(), dense, atol=tol, rtol=tol)


def test_kernel_strided_inputs_and_empty_rows(results):
    out, ref, _ = results["strided-empty-rows"]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert out[:48, 0].abs().max() == 0
