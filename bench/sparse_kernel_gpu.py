"""Block-sparse prefill kernel vs dense SDPA (flash) on CUDA, Llama-3-8B head shapes, bf16.

    python bench/sparse_kernel_gpu.py [--lengths 8192,16384,32768,65536,131072]
                                      [--densities 1.0,0.5,0.2,0.1,0.05] [--block 128] [--tune]

Prints one table row per (length, density): kernel and SDPA times, speedup, achieved TFLOP/s
(4 * D * computed (query, key) pairs * heads), and for density 1.0 the max |kernel - SDPA|.
FlexPrefill index building is timed separately (random q/k: its density is not meaningful,
its cost is). --tune first sweeps kernel tile configs at one length and uses the fastest.
Needs only torch + triton; exits with a message on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HQ, HKV, D = 32, 8, 128


def cuda_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_sdpa(q, k, v, scale):
    """Dense causal SDPA on the flash backend; GQA natively if supported, else KV expanded
    up front (the copy is not timed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))

    def native():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True
            )

    try:
        native()
        return native, "flash+gqa"
    except RuntimeError:
        ke, ve = (x.repeat_interleave(HQ // HKV, dim=1) for x in (kt, vt))

    def expanded():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, ke, ve, is_causal=True, scale=scale)

    return expanded, "flash(kv expanded)"


def tune(length: int, block: int, reps: int) -> dict:
    from engine.sparse.synthetic import random_index
    from engine.sparse.triton_kernel import block_sparse_attention_triton

    q, k, v = (torch.randn(length, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
    index = random_index(HQ, 0, length, block, 0.2, torch.Generator().manual_seed(0), device="cuda")
    best, best_ms = {}, float("inf")
    print(f"tuning at L={length}, density 0.2:")
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    cfg = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
                    if block % bm or block % bn:
                        continue
                    try:
                        ms = cuda_ms(lambda: block_sparse_attention_triton(q, k, v, index, D**-0.5, **cfg), reps)
                    except Exception as exc:  # a config the GPU cannot compile or fit
                        print(f"  {cfg}: failed ({type(exc).__name__})")
                        continue
                    print(f"  {cfg}: {ms:.3f} ms")
                    if ms < best_ms:
                        best, best_ms = cfg, ms
    print(f"best: {best}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--densities", default="1.0,0.5,0.2,0.1,0.05")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tune", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/sparse_kernel_gpu.py: needs a CUDA device and none is visible; run it on a GPU machine.")
    from engine.sparse.flexprefill import flexprefill_index
    from engine.sparse.synthetic import random_index
    from engine.sparse.triton_kernel import block_sparse_attention_triton

    print(
        f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
        f"Hq={HQ} Hkv={HKV} D={D} bf16 block={args.block}"
    )
    kcfg = tune(min(32768, max(map(int, args.lengths.split(",")))), args.block, args.reps) if args.tune else {}
    scale = D**-0.5
    header = (
        f"{'L':>7} {'dens':>5} {'actual':>6} {'kernel ms':>10} {'sdpa ms':>9} "
        f"{'speedup':>7} {'kern TF/s':>9} {'sdpa TF/s':>9} {'max|err|':>9}"
    )
    print(header)
    for length in map(int, args.lengths.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(length, h, D, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV))
        sdpa, sdpa_name = make_sdpa(q, k, v, scale)
        sdpa_ms = cuda_ms(sdpa, args.reps)
        dense_flops = 4 * D * HQ * length * (length + 1) / 2
        for density in map(float, args.densities.split(",")):
            index = random_index(HQ, 0, length, args.block, density, torch.Generator().manual_seed(1), device="cuda")
            run = lambda: block_sparse_attention_triton(q, k, v, index, scale, **kcfg)  # noqa
            ms = cuda_ms(run, args.reps)
            flops = 4 * D * index.computed_pairs()
            err = ""
            if density == 1.0:
                err = f"{(run().float() - sdpa()[0].transpose(0, 1).float()).abs().max():.2e}"
            print(
                f"{length:>7} {density:>5.2f} {index.density():>6.3f} {ms:>10.3f} "
                f"{sdpa_ms:>9.3f} {sdpa_ms / ms:>7.2f} {flops / ms / 1e9:>9.1f} "
                f"{dense_flops / sdpa_ms / 1e9:>9.1f} {err:>9}"
            )
            del index
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            res = flexprefill_index(q, k, 0, scale, args.block, 0.9, 0.1, 1024)
        torch.cuda.synchronize()
        print(
            f"{length:>7} flexprefill index build: {(time.perf_counter() - t0) / 3 * 1e3:.2f} ms"
            f" (density on random q/k {res.index.density():.3f}); sdpa backend {sdpa_name}"
        )
        del q, k, v, sdpa, res
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
