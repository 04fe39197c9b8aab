"""The Triton paged decode kernel under TRITON_INTERPRET=1 (fp32; fp16 for the low-precision dots,
bf16 is wrong in the interpreter) against the torch path, and the
engine's hook: the decode buckets the model runner builds, merged into one kernel batch, give the
same attention as the bucketed CPU path.

TRITON_INTERPRET must be set before Triton is first imported, and the test session may already
have imported it (transformers does), so every kernel call runs once in a subprocess that writes
outputs and references to a file; the tests here compare them. Shapes stay small: the interpreter
is slow.
"""

from types import SimpleNamespace

import pytest
import torch

from engine.attention import AttentionMetadata, paged_attention_forward
from engine.kv_layout import KVLayout
from engine.model_runner import ModelRunner
from engine.paged_decode import paged_decode_attention_torch
from engine.scheduler import ScheduledSeq
from tests.helpers.triton_interpret import run_interpreted

D, PAGE, TOL = 64, 16, 1e-5
# fp16 inputs: the kernel rounds the softmax weights and the output to fp16 (10 mantissa bits); the
# reference is the torch path in fp32 on the same fp16 inputs.
FP16_TOL = 3e-3
# Context lengths in one launch: 1 token, a block boundary (16, 32), just past one (17), several blocks.
LENS = [1, 16, 17, 32, 50, 83]
RATIOS = {"gqa-9-3": (9, 3), "gqa-4-2": (4, 2), "mha-8-8": (8, 8)}
# (block_n, num_splits): tiles of one block and of several, and the split-and-merge path.
TILINGS = {"n16": (16, 1), "n32": (32, 1), "n16-split3": (16, 3), "n64-split2": (64, 2)}
# Decode rows for the hook: lengths that fall into several buckets of different widths.
HOOK_LENS = [2, 16, 17, 40, 50, 83, 90]


def weightless_model(device: torch.device):
    """What ModelRunner reads of a model to build metadata: a parameter's device and a config."""
    model = torch.nn.Linear(1, 1, device=device)
    model.config = SimpleNamespace()
    return model


def kernel_case(hq: int, hkv: int, lens: list[int], seed: int = 0):
    """q as a strided view of a fused projection, one layer's K/V as views of a 6-D cache, and
    block tables drawn from a shuffled pool (rows padded with -1: the kernel must not read them)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // PAGE) for n in lens]
    num_blocks = sum(need) + 3
    layout = KVLayout("t", torch.float32, num_layers=2, num_kv_heads=hkv, head_dim=D, block_size=PAGE)
    kv = torch.randn(layout.cache_shape(num_blocks), generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((len(lens), max(need)), -1, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    q = torch.randn(len(lens), hq + 2 * hkv, D, generator=g)[:, :hq]
    return q, kv[1, 0], kv[1, 1], tables, torch.tensor(lens, dtype=torch.int32)


def hook_case(hq: int = 4, hkv: int = 2, scale: float = 0.125):
    """Decode rows built by ModelRunner.build, attended by the engine's CPU (bucketed) path.

    Returns (q of the decode rows [S, Hq, D], layer K/V cache views, meta, CPU output [S, Hq, D])."""
    g = torch.Generator().manual_seed(7)
    layout = KVLayout("t", torch.float32, num_layers=1, num_kv_heads=hkv, head_dim=D, block_size=PAGE)
    need = [-(-n // PAGE) for n in HOOK_LENS]
    kv = torch.randn(layout.cache_shape(sum(need) + 2), generator=g)
    runner = ModelRunner(weightless_model(kv.device), layout, kv)
    perm, batch = torch.randperm(kv.shape[2], generator=g).tolist(), []
    for n, nb in zip(HOOK_LENS, need):
        seq = SimpleNamespace(token_ids=[0] * n, num_tokens=n, num_computed_tokens=n - 1, block_table=perm[:nb])
        batch.append(ScheduledSeq(seq, 1))
        perm = perm[nb:]
    _, _, meta = runner.build(batch)
    t = len(HOOK_LENS)
    query = torch.randn(1, hq, t, D, generator=g)
    key, value = torch.randn(1, hkv, t, D, generator=g), torch.randn(1, hkv, t, D, generator=g)
    out, _ = paged_attention_forward(SimpleNamespace(layer_idx=0), query, key, value, None, scale, triptych_meta=meta)
    return query[0].transpose(0, 1), kv[0, 0], kv[0, 1], meta, out[0]


def _run_cases(path: str) -> None:
    """Subprocess body: every ratio x tiling, and the hook's merged batch, through the kernel."""
    from triton import knobs

    from engine.paged_decode import paged_decode_attention

    assert knobs.runtime.interpret, "TRITON_INTERPRET=1 did not take effect"
    results = {}
    for name, (hq, hkv) in RATIOS.items():
        q, k, v, tables, lens = kernel_case(hq, hkv, LENS)
        ref = paged_decode_attention_torch(q, k, v, tables, lens, D**-0.5)
        for tname, (block_n, splits) in TILINGS.items():
            out = paged_decode_attention(q, k, v, tables, lens, D**-0.5, block_n=block_n, num_splits=splits)
            results[f"{name}-{tname}"] = (out, ref)
        q, k, v = q.half(), k.half(), v.half()
        ref = paged_decode_attention_torch(q.float(), k.float(), v.float(), tables, lens, D**-0.5)
        out = paged_decode_attention(q, k, v, tables, lens, D**-0.5, block_n=16, num_splits=3)
        results[f"{name}-fp16"] = (out, ref)
    q, k, v, meta, cpu_out = hook_case()
    rows, tables, lens = meta.decode_batch
    results["hook"] = (paged_decode_attention(q.index_select(0, rows), k, v, tables, lens, 0.125), cpu_out[rows])
    torch.save(results, path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("triton")
    return run_interpreted(
        "tests.unit.test_paged_decode_triton", tmp_path_factory.mktemp("paged_decode_triton") / "results.pt", 600
    )


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("ratio", list(RATIOS))
def test_kernel_matches_torch_path(results, ratio, tiling):
    out, ref = results[f"{ratio}-{tiling}"]
    assert out.dtype == torch.float32 and out.shape == ref.shape == (len(LENS), RATIOS[ratio][0], D)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("ratio", list(RATIOS))
def test_kernel_fp16(results, ratio):
    out, ref = results[f"{ratio}-fp16"]
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=FP16_TOL, rtol=FP16_TOL)


def test_kernel_on_the_engines_merged_decode_batch(results):
    out, cpu = results["hook"]
    torch.testing.assert_close(out, cpu, atol=TOL, rtol=TOL)


def test_torch_path_is_attention_over_each_rows_context():
    """The reference itself, against softmax(q k^T) v written out per row from the block table."""
    hq, hkv = 9, 3
    q, k, v, tables, lens = kernel_case(hq, hkv, LENS, seed=1)
    out = paged_decode_attention_torch(q, k, v, tables, lens, 0.1)
    for s, n in enumerate(LENS):
        pos = torch.arange(n)
        slots = tables[s].long()[pos // PAGE] * PAGE + pos % PAGE
        ks = k.reshape(-1, hkv, D)[slots].repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]
        vs = v.reshape(-1, hkv, D)[slots].repeat_interleave(hq // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[s], ks) * 0.1, dim=-1)
        torch.testing.assert_close(out[s], torch.einsum("hn,nhd->hd", p, vs), atol=TOL, rtol=TOL)


def test_merged_decode_batch_matches_the_buckets():
    """meta.decode_batch (what the CUDA path feeds the kernel) covers every decode row once, with
    its own table and length, and the torch path on it equals the bucketed attention."""
    q, k, v, meta, cpu_out = hook_case()
    assert isinstance(meta, AttentionMetadata) and len(meta.decodes) > 1
    rows, tables, lens = meta.decode_batch
    assert tables.dtype == lens.dtype == torch.int32
    assert sorted(rows.tolist()) == list(range(len(HOOK_LENS)))
    assert lens.tolist() == [HOOK_LENS[r] for r in rows.tolist()]
    out = paged_decode_attention_torch(q.index_select(0, rows), k, v, tables, lens, 0.125)
    torch.testing.assert_close(out, cpu_out[rows], atol=TOL, rtol=TOL)
