"""The Triton paged decode kernel on CUDA against the torch path (gather + masked SDPA), and the
engine's attention taking the kernel for decode rows on CUDA. No Ray; skipped cleanly without CUDA.

Errors are relative, per (sequence, head): |out - ref| / |ref| over the head dimension, since the
output of a long random context is small and an absolute tolerance would hide a wrong row there.
Tolerances: fp32 1e-4 (both sides compute in fp32; the kernel's dots are IEEE). bf16 2e-2 against
the torch path run in fp32 on the same bf16 inputs: the kernel rounds the softmax weights (to bf16
for the PV dot) and the output to bf16, ~3 significant digits each.
"""

from types import SimpleNamespace

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from engine.attention import AttentionMetadata, DecodeBucket, paged_attention_forward  # noqa: E402
from engine.paged_decode import (  # noqa: E402
    default_num_splits,
    paged_decode_attention,
    paged_decode_attention_torch,
)

PAGE = 16
DTYPES = {"fp32": (torch.float32, 1e-4), "bf16": (torch.bfloat16, 2e-2)}
# (Hq, Hkv, D): Llama-3-8B, SmolLM2, no GQA.
SHAPES = {"llama3-32-8-128": (32, 8, 128), "smollm2-9-3-64": (9, 3, 64), "mha-8-8-64": (8, 8, 64)}


def case(hq, hkv, d, lens, dtype, seed=0):
    """Shuffled block tables over a cache with spare blocks; q a strided view like the engine's."""
    g, gpu = torch.Generator().manual_seed(seed), torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-n // PAGE) for n in lens]
    num_blocks = sum(need) + 5
    kv = torch.randn(2, num_blocks, PAGE, hkv, d, generator=gpu, device="cuda").to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    q = torch.randn(hq + 2 * hkv, len(lens), d, generator=gpu, device="cuda").to(dtype).transpose(0, 1)[:, :hq]
    return q, kv[0], kv[1], tables.cuda(), torch.tensor(lens, dtype=torch.int32).cuda()


def reference(q, k, v, tables, lens, scale):
    """The torch path in fp32 on the same (possibly bf16-rounded) inputs."""
    return paged_decode_attention_torch(q.float(), k.float(), v.float(), tables, lens, scale)


def assert_rel_close(out, ref, tol):
    err = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)  # [S, Hq]
    assert err.max() <= tol, (
        f"max relative error {err.max():.2e} > {tol:.0e} at (row, head) {divmod(int(err.argmax()), err.shape[1])}"
    )


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_torch_path(shape, dname):
    dtype, tol = DTYPES[dname]
    hq, hkv, d = SHAPES[shape]
    lens = [1, 16, 17, 4096] + torch.randint(2, 3000, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    q, k, v, tables, lens_t = case(hq, hkv, d, lens, dtype)
    out = paged_decode_attention(q, k, v, tables, lens_t, d**-0.5)
    assert out.dtype == dtype and out.shape == (len(lens), hq, d)
    ref = reference(q, k, v, tables, lens_t, d**-0.5)
    assert_rel_close(out, ref, tol)
    # The torch path in the same dtype stays within the same tolerance of its fp32 self.
    assert_rel_close(paged_decode_attention_torch(q, k, v, tables, lens_t, d**-0.5), ref, tol)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_split_kv_for_few_long_sequences(dname):
    dtype, tol = DTYPES[dname]
    q, k, v, tables, lens = case(32, 8, 128, [12345, 1, 700], dtype, seed=2)
    assert default_num_splits(3, 8, tables.shape[1] * PAGE, 64, q.device) > 1
    ref = reference(q, k, v, tables, lens, 0.088)
    for splits in (None, 1, 7):
        out = paged_decode_attention(q, k, v, tables, lens, 0.088, num_splits=splits)
        assert_rel_close(out, ref, tol)


def test_engine_attention_takes_the_kernel_on_cuda():
    """The decode buckets the model runner builds, on CUDA, through paged_attention_forward (kernel)
    give the CPU (bucketed SDPA) output."""
    from tests.unit.test_paged_decode_triton import HOOK_LENS, hook_case

    q, k, v, meta, cpu_out = hook_case()  # cache already holds this step's K/V
    buckets = [DecodeBucket(b.rows.cuda(), b.blocks.cuda(), b.mask.cuda()) for b in meta.decodes]
    kv = torch.stack([k, v])[None].cuda()  # [1 layer, 2, blocks, page, Hkv, D]
    gmeta = AttentionMetadata(kv, meta.slot_mapping.cuda(), [], buckets)
    # Re-writing the same K/V at the same slots leaves the cache as the CPU run left it.
    slots = meta.slot_mapping
    key = k.reshape(-1, k.shape[2], k.shape[3])[slots].transpose(0, 1)[None].cuda()
    value = v.reshape(-1, v.shape[2], v.shape[3])[slots].transpose(0, 1)[None].cuda()
    query = q.transpose(0, 1)[None].cuda()
    out, _ = paged_attention_forward(SimpleNamespace(layer_idx=0), query, key, value, None, 0.125, triptych_meta=gmeta)
    assert "decode_batch" in gmeta.__dict__, "the CUDA path did not build the kernel batch"
    assert out.shape == (1, len(HOOK_LENS), q.shape[1], q.shape[2])
    torch.testing.assert_close(out[0].cpu(), cpu_out, atol=1e-4, rtol=1e-4)
