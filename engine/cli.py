"""`triptych generate`: offline generation with the colocated engine."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help="prompts (each sent as one user chat message)")
    parser.add_argument("--model", default=None, help="local HF directory or .gguf file (default: embedded SmolLM2)")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="tokens to generate per prompt at most (default: 64)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 (the default) is greedy"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens of this mass (default: 1)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens only; 0: all (default)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the sampler, for reproducible sampling (default: none)"
    )
    parser.add_argument("--raw", action="store_true", help="send prompts as raw text, without the chat template")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu)")
    parser.add_argument(
        "--dtype", default=None, help="float32 | float16 | bfloat16 (default: bfloat16 on CUDA, else float32)"
    )


def run(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.errors import EngineError
    from engine.llm_engine import LLMEngine
    from engine.sequence import SamplingParams

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        )
        engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype))
        prompts = args.prompts if args.raw else [[{"role": "user", "content": p}] for p in args.prompts]
        t0 = time.perf_counter()
        outs = engine.generate(prompts, sampling)
    except EngineError as exc:
        print(f"triptych generate: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    for prompt, out in zip(args.prompts, outs):
        print(f"> {prompt}\n{out.text}\n[{len(out.token_ids)} tokens, {out.finish_reason.value}]\n")
    total = sum(len(o.token_ids) for o in outs)
    print(f"{total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0
