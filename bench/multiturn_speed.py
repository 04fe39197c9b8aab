"""Decode TPOT with decode-side KV selection on the real SmolLM2-135M, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.multiturn_speed [--contexts 4096,8000] [--batches 1,8]
        [--methods loopserve,snapkv,streaming,quest] [--budget 0.25] [--steps 48]

For each context length and batch size: one prompt of natural text (stdlib docstrings) of that
length is prefilled once (dense); the batch's sequences are that prompt plus a distinct last
token each, so with prefix caching they share every full block of it but the last (the decode
step still reads each sequence's whole context: shared blocks are read once per sequence, and
each is larger than the CPU's caches at these lengths). Then each method decodes `--steps` tokens
per sequence (ignore_eos); TPOT = the median engine step time over steps where every sequence
decodes. Steps that re-score a selection (loopserve every R tokens, snapkv once) are reported
apart: their median, and the mean cost per token they add (their extra time over the median
step, spread over all steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.ruler import doc_tokens, filler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="4096,8000")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--methods", default="loopserve,snapkv,streaming,quest")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--rescore-every", type=int, default=16)
    args = p.parse_args(argv)

    import torch

    from engine.config import EngineConfig
    from engine.kv_select.config import KVSelectionConfig
    from engine.llm_engine import LLMEngine, LoadedModel
    from engine.sequence import SamplingParams

    torch.set_num_threads(1)
    loaded = LoadedModel.load(None)
    docs = doc_tokens(loaded.tokenizer)
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    blocks = max(batches) * 16 + max(contexts) // 16 * 2 + 64
    engine = LLMEngine(
        EngineConfig(
            block_size=16, num_kv_blocks=blocks, max_num_batched_tokens=2048, max_num_seqs=64, prefix_caching=True
        ),
        loaded,
    )
    methods = [("dense", None)] + [
        (
            m,
            KVSelectionConfig(
                method=m, budget=args.budget, min_budget=min(0.1, args.budget), rescore_every=args.rescore_every
            ),
        )
        for m in args.methods.split(",")
    ]
    params = SamplingParams(max_tokens=args.steps + 1, ignore_eos=True)
    print(
        f"decode TPOT, one thread, budget {args.budget:.0%} (loopserve R={args.rescore_every}); "
        f"median step ms over {args.steps} steps",
        flush=True,
    )
    print(
        "| context | batch | method | TPOT ms | speedup | re-score steps | re-score step ms | re-score ms/token | density |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for ctx in contexts:
        prompt = filler(docs, ctx - 1)
        engine.generate([prompt + [docs[0]]], SamplingParams(max_tokens=1))  # prefill once: cached from now on
        for batch in batches:
            dense_ms = None
            for name, cfg in methods:
                engine.set_kv_selection(cfg)
                for i in range(batch):
                    engine.add_request(prompt + [docs[1 + i]], params)
                times, rescored = [], []
                while engine.has_unfinished():
                    before = engine.selector.stats.rescores if engine.selector else 0
                    decoding = sum(1 for s in engine.scheduler.running if s.num_computed_tokens >= ctx)
                    t = time.perf_counter()
                    engine.step()
                    dt = (time.perf_counter() - t) * 1e3
                    if decoding < batch:
                        continue  # a step with prefill in it
                    (rescored if engine.selector and engine.selector.stats.rescores > before else times).append(dt)
                tpot = statistics.median(times)
                dense_ms = dense_ms or tpot
                extra = sum(r - tpot for r in rescored) / max(1, len(times) + len(rescored))
                density = engine.selector.stats.density if engine.selector else 1.0
                print(
                    f"| {ctx} | {batch} | {name} | {tpot:.1f} | {dense_ms / tpot:.2f}x | {len(rescored)} | "
                    f"{statistics.median(rescored) if rescored else 0:.1f} | {extra:.1f} | {density:.2f} |",
                    flush=True,
                )
    engine.set_kv_selection(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
