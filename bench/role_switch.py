"""Role switching under a shifting load: SLO attainment over time with the role policy off and on.

    OMP_NUM_THREADS=1 python -m bench.role_switch [--requests 60] [--rate-a 0.4] [--rate-b 0.6]
        [--ttft-slo 4] [--tpot-slo 0.25] [--window 15] [--modes off on]

The trace is built from the real Azure conversation trace, keeping its arrival pattern:
  first half  ("A"): requests with a shorter prompt (<= p50) and a longer output (>= p50),
                     prompt x0.25, output x0.5 (clipped to 160): decode-heavy;
  second half ("B"): requests with a long prompt (>= p75) and a short output (<= p25),
                     prompt x0.25 (clipped to 768), output x0.1: prefill-heavy.
(Lengths are scaled so that one 1-thread CPU worker is a meaningful unit: a 768-token prefill of
SmolLM2 takes seconds on it.)
Each half's arrivals are rescaled to its rate; B starts when A's last request arrives.

Deployment: 1 prefill + 2 decode workers, 1 thread each, the real SmolLM2 (the split that suits
A). With switching on, the role policy (cluster/role_policy.py; SLOs as below, checks every 2 s,
2 in a row, 20 s cooldown, 4 requests minimum) may move workers; the switches are printed with their times.
Printed: attainment (TTFT and TPOT both met) per arrival window, per half, and overall.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from bench.common import AZURE_CONV, prompt_ids, text_token_ids
from bench.goodput import replay as goodput_replay
from cluster.config import parse_config
from cluster.controller import start_router
from placement.trace import Request, load_trace, rescale_rate


@dataclass(frozen=True)
class Outcome:
    phase: str
    arrival: float
    ttft: float
    tpot: float
    ok: bool
    error: str | None


def shifting_trace(path, n: int, rate_a: float, rate_b: float) -> list[tuple[str, Request]]:
    trace = load_trace(path)
    p = sorted(r.prompt_len for r in trace)
    o = sorted(r.output_len for r in trace)

    def q(v, x):
        return v[int(len(v) * x)]

    a = [r for r in trace if r.prompt_len <= q(p, 0.5) and r.output_len >= q(o, 0.5)][: n // 2]
    b = [r for r in trace if r.prompt_len >= q(p, 0.75) and r.output_len <= q(o, 0.25)][: n - n // 2]
    a = [Request(r.arrival_s - a[0].arrival_s, r.prompt_len, r.output_len) for r in a]
    b = [Request(r.arrival_s - b[0].arrival_s, r.prompt_len, r.output_len) for r in b]
    a = rescale_rate(
        tuple(
            Request(r.arrival_s, max(8, round(r.prompt_len * 0.25)), min(160, max(8, round(r.output_len * 0.5))))
            for r in a
        ),
        rate_a,
    )
    b = rescale_rate(
        tuple(Request(r.arrival_s, min(768, round(r.prompt_len * 0.25)), max(2, round(r.output_len * 0.1))) for r in b),
        rate_b,
    )
    gap = 1.0 / rate_b
    start_b = (a[-1].arrival_s if a else 0.0) + gap
    return [("A", r) for r in a] + [("B", Request(start_b + r.arrival_s, r.prompt_len, r.output_len)) for r in b]


def config(switching: bool, ttft_ms: float, tpot_ms: float):
    return parse_config(
        {
            "version": 1,
            "ray": {"num_cpus": 3},
            "engine": {"num_kv_blocks": 1024, "max_num_seqs": 32},
            "pools": {"prefill": {"workers": 1, "num_cpus": 1}, "decode": {"workers": 2, "num_cpus": 1}},
            "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
            "role_switching": {
                "enabled": switching,
                "interval_s": 2,
                "sustain": 2,
                "cooldown_s": 20,
                "window_s": 30,
                "min_samples": 4,
                "drain_timeout_s": 60,
            },
        },
        f"bench.role_switch:{'on' if switching else 'off'}",
    )


async def replay(router, trace, prompts, ttft_slo, tpot_slo) -> list[Outcome]:
    """bench/goodput.py's replay, each outcome tagged with its phase and arrival time."""
    outs = await goodput_replay(router, [r for _, r in trace], prompts, ttft_slo, tpot_slo)
    return [Outcome(ph, r.arrival_s, o.ttft, o.tpot, o.ok, o.error) for (ph, r), o in zip(trace, outs)]


def _pct(outs: list[Outcome]) -> str:
    return f"{100 * sum(o.ok for o in outs) / len(outs):5.1f}% ({len(outs)})" if outs else "-"


async def run_mode(mode: str, trace, args) -> tuple[list[Outcome], list]:
    router = await start_router(config(mode == "on", args.ttft_slo * 1e3, args.tpot_slo * 1e3))
    try:
        corpus = text_token_ids(router.tokenizer)
        prompts = prompt_ids(corpus, [r.prompt_len for _, r in trace], seed=11)
        # Warm-up: first-call costs (allocation, kernels) stay out of the measurement.
        warm = [("A", Request(0.0, 32, 4)), ("B", Request(0.0, 256, 2))]
        await replay(router, warm, prompt_ids(corpus, [32, 256], seed=1), 1e9, 1e9)
        router.recent.clear()
        if router.policy is not None:
            router.policy.since = time.monotonic()
        t_start = time.time()
        outs = await replay(router, trace, prompts, args.ttft_slo, args.tpot_slo)
        switches = [(s.at_unix_s - t_start, s) for s in router.switches]
        assert await router.wait_idle(60), "KV blocks still held after the replay"
        return outs, switches
    finally:
        await router.shutdown()


async def main_async(args) -> int:
    trace = shifting_trace(args.trace, args.requests, args.rate_a, args.rate_b)
    a = [r for ph, r in trace if ph == "A"]
    b = [r for ph, r in trace if ph == "B"]
    t_b = b[0].arrival_s if b else float("inf")
    print(
        f"trace: {len(a)} A requests (prompt {min(r.prompt_len for r in a)}-{max(r.prompt_len for r in a)}, "
        f"output {min(r.output_len for r in a)}-{max(r.output_len for r in a)}, {args.rate_a} req/s), then "
        f"{len(b)} B requests (prompt {min(r.prompt_len for r in b)}-{max(r.prompt_len for r in b)}, output "
        f"{min(r.output_len for r in b)}-{max(r.output_len for r in b)}, {args.rate_b} req/s) from t={t_b:.0f}s; "
        f"SLO TTFT {args.ttft_slo}s, TPOT {args.tpot_slo * 1e3:.0f}ms",
        flush=True,
    )
    results = {}
    for mode in args.modes:
        print(f"--- switching {mode} ...", flush=True)
        outs, switches = await run_mode(mode, trace, args)
        results[mode] = outs
        for at, s in switches:
            print(
                f"    t={at:5.1f}s {s.worker_id}: {s.from_role.value} -> {s.to_role.value} "
                f"(drain {s.drain_s:.1f}s, switch {s.switch_s:.2f}s) {s.reason}",
                flush=True,
            )
        errors = [o.error for o in outs if o.error]
        print(
            f"    attainment A {_pct([o for o in outs if o.phase == 'A'])}, B {_pct([o for o in outs if o.phase == 'B'])}, "
            f"errors {len(errors)}{(': ' + errors[0]) if errors else ''}",
            flush=True,
        )

    end = max(r.arrival_s for _, r in trace)
    edges = [i * args.window for i in range(int(end // args.window) + 1)]
    print(f"\nSLO attainment by arrival time (window {args.window:.0f}s; B starts at {t_b:.0f}s)")
    print("| arrivals (s) | phase | " + " | ".join(f"switching {m}" for m in args.modes) + " |")
    print("|---|---|" + "---|" * len(args.modes))
    for lo in edges:
        hi = lo + args.window
        phases = sorted({o.phase for o in results[args.modes[0]] if lo <= o.arrival < hi})
        cells = [_pct([o for o in results[m] if lo <= o.arrival < hi]) for m in args.modes]
        print(f"| {lo:.0f}-{hi:.0f} | {'+'.join(phases) or '-'} | " + " | ".join(cells) + " |")
    for label, phase in (("first half (A)", "A"), ("second half (B)", "B")):
        cells = [_pct([o for o in results[m] if o.phase == phase]) for m in args.modes]
        print(f"| {label} | {phase} | " + " | ".join(cells) + " |")
    print("| all | | " + " | ".join(_pct(results[m]) for m in args.modes) + " |")
    for m in args.modes:
        bt = sorted(o.ttft for o in results[m] if o.phase == "B" and o.error is None)
        if bt:
            print(f"switching {m}: B TTFT p50 {bt[len(bt) // 2]:.2f}s, p90 {bt[int(len(bt) * 0.9)]:.2f}s")
    return 0


def main(argv=None) -> int:
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=AZURE_CONV)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--rate-a", type=float, default=0.4)
    p.add_argument("--rate-b", type=float, default=0.6)
    p.add_argument("--ttft-slo", type=float, default=4.0)
    p.add_argument("--tpot-slo", type=float, default=0.25)
    p.add_argument("--window", type=float, default=15.0)
    p.add_argument("--modes", nargs="+", default=["off", "on"], choices=["off", "on"])
    args = p.parse_args(argv)
    if args.requests < 4 or args.rate_a <= 0 or args.rate_b <= 0:
        p.error("--requests must be >= 4 and the rates > 0")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
