"""Shared benchmark helpers: trace sampling, real-text prompts of exact lengths, timing, tables.

Trace loading and length scaling live in `placement.trace`; this module only picks a seeded
sample from a loaded trace and turns lengths into token ids.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from placement.trace import Request, load_trace, scale_lengths

AZURE_CONV = Path("/work/shared/data/traces/AzureLLMInferenceTrace_conv_2023.csv")
MOONCAKE_CONV = AZURE_CONV.with_name("mooncake_fast25_conversation_trace.jsonl")


def set_threads(n: int) -> None:
    """Pin torch (and OpenMP/MKL, for anything started later) to n threads, for every side alike."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def sample_requests(path: Path, count: int, seed: int, factor: float, max_model_len: int) -> tuple[Request, ...]:
    """`count` requests drawn without replacement (seeded), kept in arrival order, lengths scaled.

    Lengths are multiplied by `factor` (rounded, >= 1) and clipped so prompt + output <= max_model_len
    (`placement.trace.scale_lengths`).
    """
    trace = load_trace(path)
    picked = sorted(random.Random(seed).sample(range(len(trace)), count))
    return scale_lengths(tuple(trace[i] for i in picked), factor, max_model_len)


def text_token_ids(tokenizer) -> list[int]:
    """Token ids of a natural-language corpus (stdlib docstrings, as the tests' prompts use)."""
    from tests.prompts import corpus

    return tokenizer(corpus()).input_ids


def prompt_ids(corpus_ids: list[int], lengths: list[int], seed: int) -> list[list[int]]:
    """One prompt of exactly each length: a window of the corpus at a seeded offset (wrapping)."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        start = rng.randrange(len(corpus_ids))
        ids = corpus_ids[start:] + corpus_ids * (1 + n // len(corpus_ids))
        out.append(ids[:n])
    return out


def length_summary(values: list[int]) -> str:
    v = sorted(values)
    return (
        f"mean {statistics.mean(v):.0f}, p50 {v[len(v) // 2]}, p90 {v[int(len(v) * 0.9)]}, "
        f"min {v[0]}, max {v[-1]}, sum {sum(v)}"
    )


@dataclass
class Timer:
    """Wall-clock seconds and this process's CPU seconds over a `timed()` block.

    On a shared machine the wall clock also counts time the OS gave to other processes; with one
    torch thread, CPU seconds measure the work itself, so both are reported.
    """

    seconds: float = 0.0
    cpu_seconds: float = 0.0


@contextmanager
def timed():
    t = Timer()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield t
    finally:
        t.seconds = time.perf_counter() - t0
        t.cpu_seconds = time.process_time() - c0


def time_call(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of `fn`."""
    with timed() as t:
        fn()
    return t.seconds, t.cpu_seconds


def rss_kib(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process (default: this one) in KiB, from /proc (Linux)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def print_table(headers: list[str], rows: list[list[str]]) -> str:
    """Print (and return) a Markdown table, columns padded to width."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text
