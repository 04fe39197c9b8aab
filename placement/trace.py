"""Workload traces: load, rescale, slice and split request arrival traces.

Two on-disk formats are understood (see /work/shared/data/traces/README.md):

- Azure LLM inference CSV: header ``TIMESTAMP,ContextTokens,GeneratedTokens``; timestamps are
  ``YYYY-MM-DD HH:MM:SS.fffffff`` wall-clock strings.
- Mooncake JSONL: one object per line with ``timestamp`` (milliseconds), ``input_length``,
  ``output_length`` and ``hash_ids`` (ignored here).

Every loaded trace becomes a tuple of `Request`, sorted by arrival, with the first arrival at 0 s.
All transforms return new tuples and keep that invariant. Units: seconds and tokens.

This module is imported by the benchmarks too, so it depends on the standard library only.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path

from placement.errors import PlanningError


@dataclass(frozen=True)
class Request:
    """One request of a trace. arrival_s >= 0; prompt_len >= 1; output_len >= 1 (token 1 included)."""

    arrival_s: float
    prompt_len: int
    output_len: int
    num_images: int = 0


@dataclass(frozen=True)
class TraceStats:
    """Summary of a trace: count, mean arrival rate (req/s) and mean lengths (tokens)."""

    count: int
    duration_s: float
    rate: float
    mean_prompt_len: float
    mean_output_len: float


def load_trace(path: str | Path) -> tuple[Request, ...]:
    """Load an Azure ``.csv`` or Mooncake ``.jsonl`` trace; raise PlanningError if missing/malformed/empty."""
    path = Path(path)
    if not path.is_file():
        raise PlanningError(f"trace file not found: {path}")
    if path.suffix == ".csv":
        rows = _load_azure_csv(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _load_mooncake_jsonl(path)
    else:
        raise PlanningError(f"{path}: unknown trace format (expected .csv or .jsonl)")
    if not rows:
        raise PlanningError(f"{path}: trace has no requests")
    return _normalise(rows)


def _parse_azure_time(text: str) -> float:
    # Seven fractional digits ("…46.6805900") are more than datetime parses, so split them off.
    whole, _, frac = text.strip().partition(".")
    base = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.timezone.utc)
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def _load_azure_csv(path: Path) -> list[Request]:
    rows: list[Request] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise PlanningError(f"{path}: Azure CSV needs columns {sorted(need)}, got {reader.fieldnames}")
        for line_no, row in enumerate(reader, start=2):
            try:
                rows.append(
                    Request(
                        _parse_azure_time(row["TIMESTAMP"]),
                        max(1, int(row["ContextTokens"])),
                        max(1, int(row["GeneratedTokens"])),
                    )
                )
            except (ValueError, TypeError) as e:
                raise PlanningError(f"{path}:{line_no}: bad row ({e})") from None
    return rows


def _load_mooncake_jsonl(path: Path) -> list[Request]:
    rows: list[Request] = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                rows.append(
                    Request(
                        float(obj["timestamp"]) / 1000.0,
                        max(1, int(obj["input_length"])),
                        max(1, int(obj["output_length"])),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise PlanningError(f"{path}:{line_no}: bad record ({e!r})") from None
    return rows


def _normalise(rows: list[Request]) -> tuple[Request, ...]:
    rows = sorted(rows, key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    return tuple(dataclasses.replace(r, arrival_s=r.arrival_s - t0) for r in rows)


def stats(requests: tuple[Request, ...]) -> TraceStats:
    """Count, duration, mean rate and mean lengths. Rate of a one-request trace is reported as 0."""
    n = len(requests)
    if n == 0:
        return TraceStats(0, 0.0, 0.0, 0.0, 0.0)
    duration = requests[-1].arrival_s - requests[0].arrival_s
    rate = (n - 1) / duration if duration > 0 else 0.0
    return TraceStats(
        n, duration, rate, sum(r.prompt_len for r in requests) / n, sum(r.output_len for r in requests) / n
    )


def scale_time(requests: tuple[Request, ...], factor: float) -> tuple[Request, ...]:
    """Multiply every arrival time by ``factor`` (> 0); factor 2 halves the request rate."""
    if factor <= 0:
        raise PlanningError(f"time scale must be > 0, got {factor}")
    return tuple(dataclasses.replace(r, arrival_s=r.arrival_s * factor) for r in requests)


def rescale_rate(requests: tuple[Request, ...], rate: float) -> tuple[Request, ...]:
    """Stretch or squeeze arrivals so the mean rate is ``rate`` req/s; burstiness is kept.

    A trace whose arrivals are all simultaneous is spread evenly at ``rate`` instead.
    """
    if rate <= 0:
        raise PlanningError(f"rate must be > 0, got {rate}")
    current = stats(requests).rate
    if current <= 0:
        return tuple(dataclasses.replace(r, arrival_s=i / rate) for i, r in enumerate(requests))
    return scale_time(requests, current / rate)


def scale_lengths(
    requests: tuple[Request, ...], factor: float = 1.0, max_model_len: int | None = None
) -> tuple[Request, ...]:
    """Multiply prompt and output lengths by ``factor`` (rounded, >= 1), then clip to max_model_len.

    Clipping keeps prompt_len + output_len <= max_model_len: the prompt is cut first to leave room
    for at least one output token, then the output is cut to the remaining room.
    """
    if factor <= 0:
        raise PlanningError(f"length scale must be > 0, got {factor}")
    if max_model_len is not None and max_model_len < 2:
        raise PlanningError(f"max_model_len must be >= 2, got {max_model_len}")
    out = []
    for r in requests:
        p = max(1, round(r.prompt_len * factor))
        o = max(1, round(r.output_len * factor))
        if max_model_len is not None:
            p = min(p, max_model_len - 1)
            o = min(o, max_model_len - p)
        out.append(dataclasses.replace(r, prompt_len=p, output_len=o))
    return tuple(out)


def slice_trace(requests: tuple[Request, ...], start: int = 0, count: int | None = None) -> tuple[Request, ...]:
    """Requests [start, start+count), re-based so the first arrival is at 0 s."""
    if start < 0 or (count is not None and count < 0):
        raise PlanningError(f"bad trace slice start={start} count={count}")
    part = requests[start : None if count is None else start + count]
    return _normalise(list(part)) if part else ()


def split(requests: tuple[Request, ...], fit_fraction: float = 0.5) -> tuple[tuple[Request, ...], tuple[Request, ...]]:
    """Split into a leading fit part and a trailing held-out part, each re-based to 0 s.

    Contiguous halves (not interleaved) so the held-out part keeps its own burst pattern.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise PlanningError(f"fit fraction must be in (0, 1), got {fit_fraction}")
    if len(requests) < 2:
        raise PlanningError(
            f"trace has {len(requests)} request(s); need at least 2 to split into fit and held-out parts"
        )
    k = min(len(requests) - 1, max(1, math.floor(len(requests) * fit_fraction)))
    return slice_trace(requests, 0, k), slice_trace(requests, k)


def slices(requests: tuple[Request, ...], k: int, size: int) -> list[tuple[Request, ...]]:
    """`k` disjoint slices of `size` consecutive requests spread evenly over the whole trace (slice
    i starts at request i·len/k), each re-based to 0 s; a trace shorter than k·size gives k equal
    consecutive parts. Consecutive requests keep each slice's own burst pattern."""
    return [slice_trace(requests, start, end - start) for start, end in slice_ranges(len(requests), k, size)]


def slice_ranges(count: int, k: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) request indices of `slices(requests, k, size)` for a trace of `count`."""
    if k < 1 or size < 1:
        raise PlanningError(f"need k >= 1 slices of size >= 1, got k={k} size={size}")
    if count < 2 * k:
        raise PlanningError(f"trace has {count} requests; too few for {k} slices of at least 2")
    step = count / k
    size = min(size, math.floor(step))
    return [(math.floor(i * step), math.floor(i * step) + size) for i in range(k)]
