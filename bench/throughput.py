"""Engine throughput vs. transformers generate(), on requests sampled from the Azure conv trace.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.throughput [--requests 64] [--scale 0.125]
        [--threads 1] [--batch-size 8] [--batch-order prompt|arrival] [--profile cprofile|torch]

Workload: `--requests` rows drawn with a fixed seed from the Azure LLM inference conv trace (2023),
kept in arrival order; prompt and output lengths multiplied by `--scale` (rounded, >= 1) and
clipped so prompt + output <= 8192 (the model's context). Prompts are exact-length windows of a
tokenized English corpus (stdlib docstrings). Every side generates exactly each request's output
length: the engine with ignore_eos, transformers with min_new_tokens = max_new_tokens and no EOS
(eos_token_id=[]; min_new_tokens alone would mask EOS logits and change the greedy argmax).

Systems (all on the same loaded weights, float32, the same torch thread count):
  engine  all requests submitted at once to LLMEngine, timed until every one finishes;
  hf x1   model.generate() one request at a time, plain SDPA attention;
  hf x8   model.generate() on left-padded batches (attention mask), each batch run to its longest
          output; only the requested tokens count as output, the extra ones are waste.
The engine's greedy outputs are compared token by token with hf x1's.

Each system is timed in wall-clock and in this process's CPU seconds: on a shared machine the
wall clock also counts other processes' time, so compare the CPU columns. The engine line also
splits its forward CPU time into steps with prefill and decode-only steps. Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import time

import torch

from bench.common import (
    AZURE_CONV,
    length_summary,
    print_table,
    prompt_ids,
    sample_requests,
    set_threads,
    text_token_ids,
    timed,
)

MAX_MODEL_LEN = 8192


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--scale", type=float, default=0.125, help="multiply trace prompt and output lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default=str(AZURE_CONV))
    p.add_argument("--threads", type=int, default=1, help="torch threads for every system")
    p.add_argument("--batch-size", type=int, default=8, help="hf padded batch size")
    p.add_argument(
        "--batch-order",
        choices=["prompt", "arrival"],
        default="prompt",
        help="hf batches formed from requests sorted by prompt length, or in arrival order",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--systems", default="engine,hf1,hf8", help="comma list of engine, hf1, hf8")
    p.add_argument(
        "--profile",
        choices=["none", "cprofile", "torch"],
        default="none",
        help="after the timed runs, run the engine again under a profiler and print the top entries",
    )
    p.add_argument("--profile-top", type=int, default=30)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- systems
def make_engine(loaded, args, prompts, outputs):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    need = sum(math.ceil((len(p) + o) / args.block_size) for p, o in zip(prompts, outputs))
    config = EngineConfig(
        block_size=args.block_size,
        num_kv_blocks=need + 16,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=max(1, len(prompts)),
        max_model_len=MAX_MODEL_LEN,
    )
    return LLMEngine(config, loaded)


def run_engine(engine, prompts, outputs) -> list[list[int]]:
    from engine.sequence import SamplingParams

    params = [SamplingParams(max_tokens=o, ignore_eos=True) for o in outputs]
    return [r.token_ids for r in engine.generate(prompts, params)]


def split_forward_time(engine) -> dict[str, list[float]]:
    """Wrap the engine's runner so each forward's CPU seconds land under 'with prefill' or 'decode only'."""
    split = {"with prefill": [], "decode only": []}
    forward = engine.runner.forward

    def timed_forward(batch, *a, **kw):
        c0 = time.process_time()
        try:
            return forward(batch, *a, **kw)
        finally:
            kind = (
                "with prefill"
                if any(e.num_new_tokens > 1 or e.seq.num_computed_tokens == 0 for e in batch)
                else "decode only"
            )
            split[kind].append(time.process_time() - c0)

    engine.runner.forward = timed_forward
    return split


class HFRunner:
    """transformers generate() with plain SDPA attention (restored afterwards), greedy, no EOS."""

    def __init__(self, loaded) -> None:
        self.model = loaded.model
        self.pad = sorted(loaded.eos_token_ids)[0]

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
        from transformers import GenerationConfig

        gen = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=[],
            pad_token_id=self.pad,
        )
        saved = self.model.config._attn_implementation
        self.model.config._attn_implementation = "sdpa"
        try:
            with torch.inference_mode():
                return self.model.generate(ids, attention_mask=mask, generation_config=gen)
        finally:
            self.model.config._attn_implementation = saved

    def one(self, prompt: list[int], new_tokens: int) -> list[int]:
        out = self._generate(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), new_tokens)
        return out[0, len(prompt) :].tolist()

    def batch(self, prompts: list[list[int]], outputs: list[int]) -> list[list[int]]:
        """Left-padded batch run to the longest output; row i keeps its first outputs[i] tokens."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = self._generate(ids, mask, max(outputs))
        return [out[i, width : width + o].tolist() for i, o in enumerate(outputs)]


def hf_batches(prompts, outputs, size: int, order: str) -> list[list[int]]:
    """Index groups of `size` requests: by ascending prompt length, or in arrival order."""
    idx = list(range(len(prompts)))
    if order == "prompt":
        idx.sort(key=lambda i: len(prompts[i]))
    return [idx[i : i + size] for i in range(0, len(idx), size)]


# --------------------------------------------------------------------------- profile
def profile_engine(engine, prompts, outputs, kind: str, top: int) -> None:
    print(f"\n## engine profile ({kind}), one more full run\n", flush=True)
    if kind == "cprofile":
        prof = cProfile.Profile()
        prof.enable()
        run_engine(engine, prompts, outputs)
        prof.disable()
        for key in ("tottime", "cumulative"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(top)
            print(s.getvalue())
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_engine(engine, prompts, outputs)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


# --------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    from engine.llm_engine import LoadedModel

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    loaded = LoadedModel.load(None)
    reqs = sample_requests(args.trace, args.requests, args.seed, args.scale, MAX_MODEL_LEN)
    prompts = prompt_ids(text_token_ids(loaded.tokenizer), [r.prompt_len for r in reqs], args.seed)
    outputs = [r.output_len for r in reqs]
    total_out = sum(outputs)
    print(
        f"trace {args.trace}: {len(reqs)} requests sampled with seed {args.seed}, arrival order; "
        f"lengths x{args.scale} (rounded, >= 1), clipped to prompt + output <= {MAX_MODEL_LEN}"
    )
    print(f"  prompt tokens: {length_summary([len(p) for p in prompts])}")
    print(f"  output tokens: {length_summary(outputs)}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {loaded.model.dtype}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    results: dict[str, tuple[object, int]] = {}  # system -> (Timer, generated tokens incl. waste)
    engine_out = hf1_out = None
    hf = HFRunner(loaded)
    warm = [prompts[0][:16]], [4]

    if "engine" in systems:
        engine = make_engine(loaded, args, prompts, outputs)
        run_engine(engine, *warm)
        split = split_forward_time(engine)
        with timed() as t:
            engine_out = run_engine(engine, prompts, outputs)
        engine.runner.forward = engine.runner.__class__.forward.__get__(engine.runner)
        results["engine"] = (t, total_out)
        print(
            f"engine: {t.seconds:.1f}s wall, {t.cpu_seconds:.1f}s CPU; forward CPU s: "
            + ", ".join(f"{k} {sum(v):.1f} ({len(v)} steps)" for k, v in split.items()),
            flush=True,
        )
    if "hf1" in systems:
        hf.one(*[w[0] for w in warm])
        with timed() as t:
            hf1_out = [hf.one(p, o) for p, o in zip(prompts, outputs)]
        results["hf x1"] = (t, total_out)
        print(f"hf x1: {t.seconds:.1f}s wall, {t.cpu_seconds:.1f}s CPU", flush=True)
    if "hf8" in systems:
        groups = hf_batches(prompts, outputs, args.batch_size, args.batch_order)
        hf.batch(*warm)
        generated = 0
        with timed() as t:
            for g in groups:
                hf.batch([prompts[i] for i in g], [outputs[i] for i in g])
                generated += len(g) * max(outputs[i] for i in g)
        results[f"hf x{args.batch_size}"] = (t, generated)
        print(
            f"hf x{args.batch_size} ({args.batch_order} order): {t.seconds:.1f}s wall, {t.cpu_seconds:.1f}s CPU, "
            f"{generated} tokens generated for {total_out} requested",
            flush=True,
        )

    print(
        f"\n## output throughput ({len(prompts)} requests, {torch.get_num_threads()} torch thread(s), "
        f"load average at end {os.getloadavg()[0]:.1f})\n"
    )
    eng = results.get("engine", (None,))[0]
    rows = []
    for name, (t, generated) in results.items():
        wall, cpu = total_out / t.seconds, total_out / t.cpu_seconds
        ratio_wall = f"{(total_out / eng.seconds) / wall:.2f}x" if eng else "-"
        ratio_cpu = f"{(total_out / eng.cpu_seconds) / cpu:.2f}x" if eng else "-"
        rows.append(
            [
                name,
                str(len(prompts)),
                str(total_out),
                str(generated),
                f"{t.seconds:.1f}",
                f"{t.cpu_seconds:.1f}",
                f"{wall:.1f}",
                f"{cpu:.1f}",
                ratio_wall,
                ratio_cpu,
            ]
        )
    print_table(
        [
            "system",
            "requests",
            "output tokens",
            "generated",
            "wall s",
            "CPU s",
            "tok/s (wall)",
            "tok/s (CPU)",
            "engine speedup (wall)",
            "engine speedup (CPU)",
        ],
        rows,
    )

    if engine_out is not None and hf1_out is not None:
        same = sum(a == b for a, b in zip(engine_out, hf1_out))
        print(f"\ngreedy match engine vs hf x1: {same}/{len(prompts)} requests token-identical")
        for i, (a, b) in enumerate(zip(engine_out, hf1_out)):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  request {i}: prompt {len(prompts[i])}, first difference at output token {k} of {len(a)}")
    if args.profile != "none" and "engine" in systems:
        profile_engine(engine, prompts, outputs, args.profile, args.profile_top)


if __name__ == "__main__":
    main()
