"""Time to first token of one long prompt on this CPU: dense vs FlexPrefill vs static prefill,
the real SmolLM2-135M through LLMEngine (the prefill worker's path: the whole prompt in one
forward), plus the status of the GPU half (bench/sparse_kernel_gpu.py).

    OMP_NUM_THREADS=1 python bench/sparse_speed.py [--lengths 4096,8176] [--reps 3] [--gamma G]

Per length: one RULER needle prompt (natural text, bench/ruler.py). Each method gets its own
engine and a 1024-token warm-up request first; then the methods run interleaved, `reps` rounds,
so load from other processes on a shared machine hits them alike; the median TTFT (add_request
-> first token, max_tokens=1) is reported. FlexPrefill's density is recorded from the engine's
own sparse calls in the first round (mean over layers); the static pattern's local window is
then chosen so its density is the closest to that, and it joins the rounds. Thread count is torch's (set OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ruler import make_tasks  # noqa: E402
from bench.sparse_quality import static_local_for  # noqa: E402


class DensityProbe:
    """Records SparsePrefillStats.density of every sparse_prefill_attention call while active."""

    def __init__(self) -> None:
        import engine.sparse as sp

        self.sp, self.orig, self.seen = sp, sp.sparse_prefill_attention, []

    def __enter__(self):
        def probe(*a, **kw):
            out, stats = self.orig(*a, **kw)
            self.seen.append(stats.density)
            return out, stats

        self.sp.sparse_prefill_attention = probe  # _attend_segment imports it per call
        return self

    def __exit__(self, *exc) -> None:
        self.sp.sparse_prefill_attention = self.orig


def ttft(engine, ids: list[int]) -> float:
    from engine.sequence import SamplingParams

    t0 = time.perf_counter()
    engine.add_request(ids, SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def gpu_status() -> str:
    if torch.cuda.is_available():
        return (
            f"GPU: {torch.cuda.get_device_name()} present; run python "
            f"bench/sparse_kernel_gpu.py for the Triton kernel vs SDPA (flash) table"
        )
    return (
        "GPU: no CUDA on this machine; the Triton kernel vs SDPA comparison "
        "(bench/sparse_kernel_gpu.py) was not run here and needs a CUDA machine"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,8176")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default="dense,flexprefill,static")
    ap.add_argument("--gamma", type=float, default=None, help="FlexPrefill gamma (default: SparsePrefillConfig's)")
    args = ap.parse_args()

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine, LoadedModel
    from engine.sparse import SparsePrefillConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    loaded = LoadedModel.load(None)
    heads = loaded.model.config.num_attention_heads
    flex = SparsePrefillConfig(
        method="flexprefill", dense_below=1024, **({"gamma": args.gamma} if args.gamma is not None else {})
    )
    print(
        f"SmolLM2-135M-Instruct fp32 on CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} at start; "
        f"flexprefill gamma={flex.gamma} tau={flex.tau} min_budget={flex.min_budget} "
        f"block={flex.block_size}; median of {args.reps} interleaved runs after a warm-up",
        flush=True,
    )
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        ids = list(make_tasks(loaded.tokenizer, length, ("needle",), 1)[0].prompt_ids)

        def engine_for(sparse):
            return LLMEngine(
                EngineConfig(
                    num_kv_blocks=length // 16 + 8, max_num_batched_tokens=length, max_num_seqs=1, sparse=sparse
                ),
                loaded,
            )

        warm = list(make_tasks(loaded.tokenizer, 1024, ("needle",), 1)[0].prompt_ids)
        methods = args.methods.split(",")
        configs = {"dense": None, "flexprefill": flex}
        engines = {m: engine_for(configs[m]) for m in ("dense", "flexprefill") if m in methods}
        if "static" in methods and "flexprefill" not in engines:
            raise SystemExit("static is matched to flexprefill's density: run both")
        for engine in engines.values():
            ttft(engine, warm)  # 1024 tokens: the sparse path runs too (dense_below)
        times = {name: [] for name in engines}
        density = {"dense": 1.0}
        for rep in range(args.reps):
            for name in list(engines):
                with DensityProbe() as probe:
                    times[name].append(ttft(engines[name], ids))
                if probe.seen and rep == 0:
                    density[name] = statistics.mean(probe.seen)
                if name == "flexprefill" and rep == 0 and "static" in methods:
                    local = static_local_for(density[name], length, heads, flex)
                    static = f"static(local={local})"
                    engines[static] = engine_for(replace(flex, method="static", local=local))
                    ttft(engines[static], warm)
                    with DensityProbe() as probe:
                        times[static] = [ttft(engines[static], ids)]
                    density[static] = statistics.mean(probe.seen)
        base = statistics.median(times["dense"]) if "dense" in times else None
        for name in engines:
            med = statistics.median(times[name])
            speedup = f"{base / med:.2f}x" if base else "-"
            rows.append((length, name, density[name], med, min(times[name]), speedup))
            print(f"  {length} {name}: {[round(t, 1) for t in times[name]]}", flush=True)
        for engine in engines.values():
            assert engine.blocks.all_free()

    print()
    print(f"{'L':>5} {'method':<16} {'density':>7} {'TTFT med s':>10} {'min s':>7} {'vs dense':>8}")
    for length, name, dens, med, best, speedup in rows:
        print(f"{length:>5} {name:<16} {dens:>7.3f} {med:>10.2f} {best:>7.2f} {speedup:>8}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    print(gpu_status())


if __name__ == "__main__":
    main()
