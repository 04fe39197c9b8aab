"""Per-token cost of detokenization as the output grows: the incremental decoder (each token
decoded once by `tokenizers`' DecodeStream) against re-decoding the whole output every step.

    .venv/bin/python -m bench.detokenizer [--lengths 128 1024 4096] [--stop "</s>"]

Feeds the SmolLM2 tokenizer's ids of a long English text, one token at a time, through
engine/detokenizer.py's Detokenizer as the engine does (a stop string held back), and prints the
mean microseconds per token over the last 64 tokens at each output length: flat in the length
for the incremental decoder, growing with it for the full re-decode.
"""

from __future__ import annotations

import argparse
import time

from bench.common import print_table
from engine.detokenizer import Detokenizer

TEXT = (
    "Disaggregated serving splits the prefill of a prompt from the decoding of its answer, so each "
    "phase runs on workers sized for it; the key-value cache moves between them layer by layer. "
    "Über naïve café façades, 日本語 and emoji 🙂 make multi-byte characters split across tokens. "
)
WINDOW = 64


def per_token_us(tokenizer, ids: list[int], stop: tuple[str, ...], incremental: bool) -> float:
    """Mean µs of one update over the last WINDOW tokens of `ids`, fed one at a time."""
    d = Detokenizer(tokenizer, stop, incremental=incremental)
    spent = 0.0
    for n in range(1, len(ids) + 1):
        prefix = ids[:n]  # the engine passes a sequence's token list as it grows, uncopied
        t = time.perf_counter()
        d.update(prefix)
        if n > len(ids) - WINDOW:
            spent += time.perf_counter() - t
    return spent / WINDOW * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 4096], help="output lengths in tokens")
    p.add_argument("--stop", nargs="*", default=["</s>"], help="stop strings (held back as the engine does)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from engine import model_loader

    tokenizer = AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))
    ids = tokenizer.encode(TEXT * (max(args.lengths) // 40 + 2))
    rows = []
    for n in args.lengths:
        fast = per_token_us(tokenizer, ids[:n], tuple(args.stop), incremental=True)
        full = per_token_us(tokenizer, ids[:n], tuple(args.stop), incremental=False)
        rows.append([str(n), f"{fast:.1f}", f"{full:.1f}", f"{full / fast:.1f}x"])
    print(f"µs per token over the last {WINDOW} tokens of outputs of each length (SmolLM2 tokenizer)")
    print_table(["output tokens", "incremental µs/token", "full re-decode µs/token", "full / incremental"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
