"""Goodput on this machine: replay a scaled slice of the Azure conversation trace at several
request rates against a colocated and a disaggregated deployment of the real model, and print
TTFT / TPOT percentiles and SLO attainment (both SLOs met) per rate.

Both deployments get the same CPU: colocated = 2 workers x 1 thread; disaggregated = 1 prefill +
1 decode worker x 1 thread. Scaling: prompt and output lengths are multiplied by --length-scale
(clipped to the context), arrivals are rescaled to each rate keeping the trace's inter-arrival
pattern. Usage:
    python -m bench.goodput --rates 0.5 1 2 --requests 40 [--slice-start 0] [--modes colocated disaggregated]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass

from bench.common import AZURE_CONV, prompt_ids, text_token_ids
from cluster.config import parse_config
from cluster.controller import start_router
from cluster.router_api import FinalEvent, GenerateInput
from engine.sequence import SamplingParams
from placement.trace import load_trace, rescale_rate, scale_lengths, slice_trace


@dataclass(frozen=True)
class Outcome:
    ttft: float
    tpot: float
    ok: bool
    error: str | None
    queue_s: float = 0.0  # the server's timings (bench/plan_validation.py reports them)
    prefill_s: float = 0.0


def deploy_config(mode: str, source: str, **sections):
    """The benches' local deployment of `mode` on this 2-core machine (colocated: 2 workers of 1
    CPU; disaggregated: 1 prefill + 1 decode worker of 1 CPU each) with the deploy YAML's other
    `sections` (slo, engine, server, ...); `source` names it in config errors."""
    pools = (
        {"colocated": {"workers": 2, "num_cpus": 1}}
        if mode == "colocated"
        else {"prefill": {"workers": 1, "num_cpus": 1}, "decode": {"workers": 1, "num_cpus": 1}}
    )
    return parse_config({"version": 1, "mode": mode, "ray": {"num_cpus": 3}, "pools": pools, **sections}, source)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def replay(router, requests, prompts, ttft_slo: float, tpot_slo: float) -> list[Outcome]:
    t0 = time.monotonic()

    async def one(i, req, ids) -> Outcome:
        await asyncio.sleep(max(0.0, req.arrival_s - (time.monotonic() - t0)))
        inp = GenerateInput(
            f"gp-{time.monotonic_ns()}-{i}",
            SamplingParams(max_tokens=max(1, req.output_len), ignore_eos=True),
            token_ids=tuple(ids),
            deadline_s=300,
        )
        final = None
        async for ev in router.generate(inp):
            if isinstance(ev, FinalEvent):
                final = ev
        t = final.timings
        ok = final.error is None and t.ttft_s <= ttft_slo and t.tpot_s <= tpot_slo
        return Outcome(t.ttft_s, t.tpot_s, ok, final.error)

    return await asyncio.gather(*(one(i, r, p) for i, (r, p) in enumerate(zip(requests, prompts))))


def summarize(mode: str, rate: float, outcomes: list[Outcome]) -> str:
    ttft = [o.ttft for o in outcomes if o.error is None]
    tpot = [o.tpot for o in outcomes if o.error is None and o.tpot > 0]
    att = sum(o.ok for o in outcomes) / len(outcomes)
    errs = sum(o.error is not None for o in outcomes)
    return (
        f"{mode:>13} {rate:6.2f} {len(outcomes):5d} {errs:4d} "
        f"{percentile(ttft, 50):7.2f} {percentile(ttft, 90):7.2f} {percentile(ttft, 99):7.2f} "
        f"{percentile(tpot, 50) * 1e3:7.0f} {percentile(tpot, 90) * 1e3:7.0f} {percentile(tpot, 99) * 1e3:7.0f} "
        f"{att * 100:6.1f}%"
    )


async def main_async(args) -> int:
    trace = slice_trace(load_trace(args.trace), args.slice_start, args.requests)
    trace = scale_lengths(trace, args.length_scale, args.max_len)
    header = (
        f"{'mode':>13} {'rate':>6} {'reqs':>5} {'err':>4} {'TTFTp50':>7} {'TTFTp90':>7} {'TTFTp99':>7} "
        f"{'TPOTp50':>7} {'TPOTp90':>7} {'TPOTp99':>7} {'attain':>7}"
    )
    print(
        f"trace {args.trace.name}: requests {args.slice_start}..{args.slice_start + len(trace)}, lengths x{args.length_scale} "
        f"(clipped to {args.max_len}); SLO TTFT {args.ttft_slo}s, TPOT {args.tpot_slo * 1e3:.0f}ms; seconds unless ms"
    )
    rows = []
    for mode in args.modes:
        slo = {"ttft_ms": args.ttft_slo * 1e3, "tpot_ms": args.tpot_slo * 1e3}
        router = await start_router(deploy_config(mode, f"bench.goodput:{mode}", slo=slo))
        try:
            corpus = text_token_ids(router.tokenizer)
            prompts = prompt_ids(corpus, [r.prompt_len for r in trace], seed=7)
            # warm-up: one short request so first-call costs do not land on the measurement
            await replay(router, rescale_rate(trace[:2], 10.0), prompts[:2], 1e9, 1e9)
            for rate in args.rates:
                outcomes = await replay(router, rescale_rate(trace, rate), prompts, args.ttft_slo, args.tpot_slo)
                rows.append(summarize(mode, rate, outcomes))
                print(rows[-1], flush=True)
            assert await router.wait_idle(30), "KV blocks still held after the replay"
        finally:
            await router.shutdown()
    print("\n" + header)
    for row in rows:
        print(row)
    return 0


def main(argv=None) -> int:
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=AZURE_CONV)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--slice-start", type=int, default=0)
    p.add_argument("--length-scale", type=float, default=0.125)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.25)
    p.add_argument("--modes", nargs="+", default=["colocated", "disaggregated"], choices=["colocated", "disaggregated"])
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
