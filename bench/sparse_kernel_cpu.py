"""CPU micro-benchmark: torch block-sparse prefill vs dense causal SDPA, SmolLM2 head shapes.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.sparse_kernel_cpu [--lengths 4096,8192]
                                      [--densities 0.1,0.2,0.3,1.0] [--block 128] [--reps 3]

Dense and sparse runs are interleaved and the minimum wall time of each is kept, so load from
other processes on a shared machine biases both alike; process CPU time is printed too. Indexes
are random at the given density (sink and diagonal included); FlexPrefill index building is
timed on its own (on random q/k its density is not meaningful, its cost is). The CUDA
counterpart is bench/sparse_kernel_gpu.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_call  # noqa: E402
from engine.sparse.dense import dense_causal_attention  # noqa: E402
from engine.sparse.flexprefill import flexprefill_index  # noqa: E402
from engine.sparse.synthetic import random_index  # noqa: E402
from engine.sparse.torch_impl import block_sparse_attention_torch  # noqa: E402

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M


def run(lengths: list[int], densities: list[float], block: int, reps: int) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, Hq={HQ} Hkv={HKV} "
        f"D={D} fp32, block {block}; min over {reps} interleaved runs"
    )
    print(f"{'L':>6} {'density':>7} {'dense s':>8} {'sparse s':>8} {'speedup':>7} {'dense cpu':>9} {'sparse cpu':>10}")
    scale = D**-0.5
    for length in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(length, h, D, generator=g) for h in (HQ, HKV, HKV))
        dense = lambda: dense_causal_attention(q, k, v, 0, scale)  # noqa: E731
        for density in densities:
            index = random_index(HQ, 0, length, block, density, torch.Generator().manual_seed(1))
            sparse = lambda: block_sparse_attention_torch(q, k, v, index, scale)  # noqa: E731
            sparse()
            best_d, best_s = (float("inf"),) * 2, (float("inf"),) * 2
            for _ in range(reps):
                best_d = min(best_d, time_call(dense))
                best_s = min(best_s, time_call(sparse))
            print(
                f"{length:>6} {index.density():>7.3f} {best_d[0]:>8.3f} {best_s[0]:>8.3f} "
                f"{best_d[0] / best_s[0]:>7.2f} {best_d[1]:>9.3f} {best_s[1]:>10.3f}"
            )
        build = min(time_call(lambda: flexprefill_index(q, k, 0, scale, block, 0.9, 0.1, 512))[0] for _ in range(reps))
        print(f"{length:>6} flexprefill index build {build:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--densities", default="0.1,0.2,0.3,1.0")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    run([int(x) for x in args.lengths.split(",")], [float(x) for x in args.densities.split(",")], args.block, args.reps)


if __name__ == "__main__":
    main()
