"""Dense prefill attention with grouped KV heads on CPU: SDPA's `enable_gqa=True` against expanding
the KV heads first (`repeat_interleave`), at SmolLM2-135M geometry (9 query heads, 3 KV heads,
head_dim 64, float32), the tensors laid out as the engine lays them out (4-D transposed views of
[L, H, D] rows, engine/attention.py and engine/sparse/dense.py).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.gqa_prefill [--lengths 512,2048,8192] [--reps 5]

Two cases per length L: a whole prompt (L queries over L keys, is_causal), and a later chunk
(the last 512 queries over L keys, an explicit causal mask: a chunked prefill's second chunk).
The two ways run interleaved and the minimum of `reps` runs of each is kept, so load from other
processes hits both alike; process CPU time is printed too. The expanded time includes the
expansion. Outputs are compared (max |difference|) so both compute the same thing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import time_call  # noqa: E402
from engine.sparse.dense import causal_mask  # noqa: E402

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M
CHUNK = 512


def gqa(q, k, v, mask, scale):
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def expanded(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def run(lengths: list[int], reps: int) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), Hq={HQ} Hkv={HKV} D={D} fp32; "
        f"min over {reps} interleaved runs (wall s; process CPU s in brackets)"
    )
    print(f"{'L':>6} {'case':>10} {'enable_gqa':>18} {'expand':>18} {'expand/gqa':>10} {'max|diff|':>9}")
    scale = D**-0.5
    for length in lengths:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(length, h, D, generator=g) for h in (HQ, HKV, HKV))
        kh, vh = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, L, D] views
        cases = [("prompt", q.transpose(0, 1)[None], None)]
        if length > CHUNK:
            cases.append(
                (f"chunk {CHUNK}", q[-CHUNK:].transpose(0, 1)[None], causal_mask(length - CHUNK, CHUNK, length))
            )
        for name, qh, mask in cases:
            a, b = gqa(qh, kh, vh, mask, scale), expanded(qh, kh, vh, mask, scale)  # warm-up and check
            diff = (a - b).abs().max().item()
            best_g = best_e = (float("inf"), float("inf"))
            for _ in range(reps):
                best_g = min(best_g, time_call(lambda: gqa(qh, kh, vh, mask, scale)))
                best_e = min(best_e, time_call(lambda: expanded(qh, kh, vh, mask, scale)))
            print(
                f"{length:>6} {name:>10} {best_g[0]:>8.4f} [{best_g[1]:>7.4f}] {best_e[0]:>8.4f} [{best_e[1]:>7.4f}] "
                f"{best_e[0] / best_g[0]:>10.2f} {diff:>9.1e}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    run([int(x) for x in args.lengths.split(",")], args.reps)


if __name__ == "__main__":
    main()
