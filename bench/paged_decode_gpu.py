"""Paged decode attention on CUDA: the Triton kernel vs the torch path (bucketed gather + SDPA).

    python bench/paged_decode_gpu.py [--batches 1,8,32,128] [--contexts 512,2048,8192] [--dtype bfloat16]

For each head shape (Llama-3-8B 32/8/128, SmolLM2 9/3/64), batch size and context length, one
layer's decode attention over a shuffled paged cache (block size 16): the kernel (one launch) and
the path engine/attention.py takes on CPU, run on the GPU (decode rows bucketed by context length
by engine.model_runner, one gather + masked SDPA per bucket). "uniform" rows all have the context
length; "mixed" rows draw it uniformly from [1, context]. Prints median times, the speedup, the
kernel's achieved K/V read bandwidth and max |kernel - torch|. Exits with a message without CUDA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sparse_kernel_gpu import cuda_ms  # noqa: E402

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
PAGE = 16


def weightless_model(device: torch.device):
    """What ModelRunner reads of a model to build metadata: a parameter's device and a config."""
    model = torch.nn.Linear(1, 1, device=device)
    model.config = SimpleNamespace()
    return model


def decode_meta(hkv: int, d: int, lens: list[int], dtype: torch.dtype):
    """A one-layer CUDA cache (random K/V) and the decode buckets ModelRunner.build makes for
    these rows over shuffled block tables, moved to the GPU."""
    from engine.attention import DecodeBucket
    from engine.kv_layout import KVLayout
    from engine.model_runner import ModelRunner
    from engine.scheduler import ScheduledSeq

    layout = KVLayout("bench", dtype, num_layers=1, num_kv_heads=hkv, head_dim=d, block_size=PAGE)
    need = [-(-n // PAGE) for n in lens]
    kv = torch.randn(layout.cache_shape(sum(need) + 1), device="cuda", dtype=dtype)
    runner = ModelRunner(weightless_model(kv.device), layout, kv)
    perm, batch = torch.randperm(kv.shape[2]).tolist(), []
    for n, nb in zip(lens, need):
        seq = SimpleNamespace(token_ids=[0] * n, num_tokens=n, num_computed_tokens=n - 1, block_table=perm[:nb])
        batch.append(ScheduledSeq(seq, 1))
        perm = perm[nb:]
    _, _, meta = runner.build(batch)
    return kv, [DecodeBucket(b.rows.cuda(), b.blocks.cuda(), b.mask.cuda()) for b in meta.decodes]


def torch_path(q, k_blocks, v_blocks, buckets, scale):
    """engine/attention.py's bucketed decode loop (its CPU path), on whatever device the tensors are."""
    out = torch.empty_like(q)
    n_kv, d = k_blocks.shape[2], k_blocks.shape[3]
    for bucket in buckets:
        b = bucket.rows.shape[0]
        qd = q.index_select(0, bucket.rows).unsqueeze(2)
        kd = k_blocks.index_select(0, bucket.blocks).view(b, -1, n_kv, d).transpose(1, 2)
        vd = v_blocks.index_select(0, bucket.blocks).view(b, -1, n_kv, d).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bucket.mask, scale=scale, enable_gqa=True)
        out.index_copy_(0, bucket.rows, od.squeeze(2))
    return out


def run_case(hq: int, hkv: int, d: int, lens: list[int], dtype: torch.dtype, reps: int) -> tuple:
    """(kernel ms, torch ms, buckets, kernel K/V read GB/s, max |kernel - torch|) for one batch."""
    from engine.attention import AttentionMetadata
    from engine.paged_decode import paged_decode_attention

    kv, buckets = decode_meta(hkv, d, lens, dtype)
    k_blocks, v_blocks = kv[0, 0], kv[0, 1]
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=dtype)
    rows, tables, lens_t = AttentionMetadata(kv, torch.empty(0, dtype=torch.long), [], buckets).decode_batch
    qr, scale = q.index_select(0, rows), d**-0.5
    kernel = lambda: paged_decode_attention(qr, k_blocks, v_blocks, tables, lens_t, scale)  # noqa: E731
    reference = lambda: torch_path(q, k_blocks, v_blocks, buckets, scale)  # noqa: E731
    kernel_ms, torch_ms = cuda_ms(kernel, reps), cuda_ms(reference, reps)
    err = (kernel().float() - reference().index_select(0, rows).float()).abs().max().item()
    read = 2 * sum(lens) * hkv * d * kv.element_size()
    return kernel_ms, torch_ms, len(buckets), read / kernel_ms / 1e6, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/paged_decode_gpu.py: needs a CUDA device and none is visible; run it on a GPU machine.")
    from engine.paged_decode import default_num_splits

    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {args.dtype}  block {PAGE}")
    print(
        f"{'shape':>10} {'rows':>7} {'B':>4} {'ctx':>6} {'splits':>6} {'buckets':>7} "
        f"{'kernel ms':>9} {'torch ms':>9} {'speedup':>7} {'kern GB/s':>9} {'max|err|':>9}"
    )
    device = torch.device("cuda", torch.cuda.current_device())
    for name, (hq, hkv, d) in SHAPES.items():
        for mixed in (False, True):
            for ctx in map(int, args.contexts.split(",")):
                for batch in map(int, args.batches.split(",")):
                    g = torch.Generator().manual_seed(batch * 7 + ctx)
                    lens = torch.randint(2, ctx + 1, (batch,), generator=g).tolist() if mixed else [ctx] * batch
                    kernel_ms, torch_ms, buckets, gbs, err = run_case(hq, hkv, d, lens, dtype, args.reps)
                    splits = default_num_splits(batch, hkv, -(-max(lens) // PAGE) * PAGE, 64, device)
                    print(
                        f"{name:>10} {'mixed' if mixed else 'uniform':>7} {batch:>4} {ctx:>6} {splits:>6} "
                        f"{buckets:>7} {kernel_ms:>9.3f} {torch_ms:>9.3f} {torch_ms / kernel_ms:>7.2f} "
                        f"{gbs:>9.1f} {err:>9.2e}"
                    )
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
