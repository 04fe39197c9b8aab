"""Prefix caching on a real trace: hit rate against the trace's ideal reuse, prefill tokens
computed and TTFT, with engine.prefix_caching off and on, on a local cluster serving SmolLM2.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.prefix_cache [--trace FILE] [--requests 80]
        [--conversations K] [--block-tokens 16] [--time-scale 4] [--output-scale 0.03]
        [--max-blocks 48] [--modes colocated disaggregated] [--max-local-prefill 256]

The trace is in the Mooncake format (one JSON object per line: `timestamp` in ms, `input_length`,
`output_length`, `hash_ids`: one id per 512-token prefix block, equal ids meaning equal blocks).
Replay, with every scaling said in the output:
- each hash id becomes a deterministic block of --block-tokens token ids (a generator seeded by
  the id), so equal ids give equal tokens and shared prefixes stay shared; a prompt is its ids'
  blocks in order, at most --max-blocks of them (lengths scale by block_tokens / 512);
- output length = output_length x --output-scale, at least 1, at most --max-output (ignore_eos);
- arrival = timestamp x --time-scale (> 1 slower than the trace, < 1 faster);
- --conversations K keeps whole conversations, one in K: a short window of the trace holds few
  later turns of its conversations (turns are minutes apart), so its reuse is low (5-8% in 200
  requests of the Mooncake conversation trace, 37% over the whole hour); one conversation in K
  over the whole trace keeps its reuse (44% at K = 80) at 1/K of its load.
The ideal reuse is an infinite cache's: the leading ids of each request already seen in an earlier
request, but never the last block of a prompt (its last token is computed for its logits, as the
engine does). Deployments (--modes): colocated = 2 colocated workers of 1 CPU; disaggregated = 1
prefill + 1 decode worker of 1 CPU each. With the cache on, each --routing: cache-aware (a prompt
goes where its prefix is likely cached, weighed against load: cluster/prefix_index.py) or load
(the least loaded worker, which may not hold a conversation's history); with it off, by load.
Prints per run: requests served, hit rate in prompt tokens and as a share of the ideal, prefill
tokens computed, how many requests the decode worker prefilled itself (disaggregated: a next turn
adding at most --max-local-prefill tokens to what it holds), TTFT p50 / p90 (server-measured)
and the wall time. Goodput against SLOs is not
computed here (bench/goodput.py measures it rate by rate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import MOONCAKE_CONV, print_table
from bench.goodput import deploy_config, percentile


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    hash_ids: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Outcome:
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    error: str | None
    prefilled_by_decode: bool  # disaggregated: no prefill phase (conditional disaggregation)


def load(path: Path, start: int, count: int, args) -> list[TraceRequest]:
    """Requests start..start+count-1 of the trace (of the sampled conversations with --conversations)."""
    rows = []
    k = getattr(args, "conversations", 1)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            # whole conversations: a conversation's turns share their second block (the first, id 0
            # in the Mooncake trace, is the system prompt every request starts with)
            if k > 1 and (len(r["hash_ids"]) < 2 or r["hash_ids"][1] % k):
                continue
            if start > 0:
                start -= 1
                continue
            if len(rows) == count:
                break
            ids = tuple(r["hash_ids"][: args.max_blocks])
            out = max(1, min(args.max_output, round(r["output_length"] * args.output_scale)))
            rows.append(TraceRequest(r["timestamp"] / 1e3 * args.time_scale, ids, out))
    if not rows:
        raise SystemExit(f"{path}: no requests from {start}")
    t0 = rows[0].arrival_s
    return [TraceRequest(r.arrival_s - t0, r.hash_ids, r.output_len) for r in rows]


def block_tokens(hash_id: int, n: int, vocab: int) -> list[int]:
    import torch

    gen = torch.Generator().manual_seed(1_000_003 * (hash_id + 1))
    return torch.randint(3, vocab, (n,), generator=gen).tolist()


def ideal_hits(requests: list[TraceRequest], block: int) -> int:
    """Tokens an infinite cache would serve (leading ids seen before; never a prompt's last block)."""
    seen: set[int] = set()
    hits = 0
    for r in requests:
        n = 0
        while n < len(r.hash_ids) and r.hash_ids[n] in seen:
            n += 1
        hits += min(n, len(r.hash_ids) - 1) * block
        seen.update(r.hash_ids)
    return hits


def deploy(mode: str, caching: bool, blocks: int, routing: str = "cache-aware", local_prefill: int = 256):
    return deploy_config(
        mode,
        f"bench.prefix_cache:{mode}:{'on' if caching else 'off'}:{routing}",
        engine={"prefix_caching": caching, "num_kv_blocks": blocks},
        server={"cache_aware_routing": routing == "cache-aware", "max_local_prefill_tokens": local_prefill},
    )


async def replay(router, requests: list[TraceRequest], prompts: list[list[int]]) -> list[Outcome]:
    from cluster.router_api import FinalEvent, GenerateInput
    from engine.sequence import SamplingParams

    t0 = time.monotonic()

    async def one(i: int, req: TraceRequest, ids: list[int]) -> Outcome:
        await asyncio.sleep(max(0.0, req.arrival_s - (time.monotonic() - t0)))
        inp = GenerateInput(
            f"pc-{time.monotonic_ns()}-{i}",
            SamplingParams(max_tokens=req.output_len, ignore_eos=True),
            token_ids=tuple(ids),
            deadline_s=600,
        )
        final = None
        async for ev in router.generate(inp):
            if isinstance(ev, FinalEvent):
                final = ev
        return Outcome(
            final.prompt_tokens, final.cached_tokens, final.timings.ttft_s, final.error, final.timings.prefill_s == 0
        )

    return await asyncio.gather(*(one(i, r, p) for i, (r, p) in enumerate(zip(requests, prompts))))


async def main_async(args) -> int:
    from cluster.controller import start_router

    requests = load(args.trace, args.start, args.requests, args)
    block = args.block_tokens
    total = sum(len(r.hash_ids) * block for r in requests)
    ideal = ideal_hits(requests, block)
    print(
        f"trace {args.trace.name}: requests {args.start}..{args.start + len(requests) - 1}"
        + (f" of 1 conversation in {args.conversations}" if args.conversations > 1 else "")
        + f"; each 512-token hash block "
        f"-> {block} tokens (at most {args.max_blocks} blocks), outputs x{args.output_scale} (1..{args.max_output}), "
        f"time x{args.time_scale} ({requests[-1].arrival_s:.0f}s); prompt tokens {total}, ideal reuse "
        f"{ideal} ({ideal / total:.1%}, an infinite cache)",
        flush=True,
    )
    rows = []
    runs = [(False, "load")] + [(True, r) for r in args.routing]
    for mode in args.modes:
        for caching, routing in runs:
            config = deploy(mode, caching, args.kv_blocks, routing, args.max_local_prefill)
            router = await start_router(config, progress=lambda m: None)
            try:
                vocab = len(router.tokenizer)
                prompts = [[t for h in r.hash_ids for t in block_tokens(h, block, vocab)] for r in requests]
                # first-call costs off the measurement; its tokens occur in no prompt of the trace
                await replay(router, [TraceRequest(0.0, (-1,), 2)], [[4] * block])
                t = time.monotonic()
                outs = await replay(router, requests, prompts)
                wall = time.monotonic() - t
                assert await router.wait_idle(30), "KV blocks still held after the replay"
            finally:
                await router.shutdown()
            ok = [o for o in outs if o.error is None]
            prompt_tokens = sum(o.prompt_tokens for o in ok)
            cached = sum(o.cached_tokens for o in ok)
            ttft = [o.ttft_s for o in ok]
            rows.append(
                [
                    mode,
                    "on" if caching else "off",
                    routing,
                    f"{len(ok)}/{len(outs)}",
                    f"{cached / max(1, prompt_tokens):.1%}",
                    f"{cached / max(1, ideal):.0%}",
                    str(prompt_tokens - cached),
                    str(sum(o.prefilled_by_decode for o in ok)) if mode == "disaggregated" else "-",
                    f"{percentile(ttft, 50) * 1e3:.0f}",
                    f"{percentile(ttft, 90) * 1e3:.0f}",
                    f"{wall:.0f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    print()
    print_table(
        [
            "deployment",
            "prefix cache",
            "routing",
            "ok",
            "hit rate (tokens)",
            "of ideal",
            "prefill tokens computed",
            "prefilled on decode",
            "TTFT p50 ms",
            "TTFT p90 ms",
            "wall s",
        ],
        rows,
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trace", type=Path, default=MOONCAKE_CONV)
    p.add_argument("--start", type=int, default=0, help="first request of the trace")
    p.add_argument("--requests", type=int, default=80)
    p.add_argument(
        "--conversations",
        type=int,
        default=1,
        metavar="K",
        help="keep whole conversations, 1 in K (by their second hash block): the reuse of a long stretch of the "
        "trace at 1/K of its load",
    )
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per 512-token hash block")
    p.add_argument("--max-blocks", type=int, default=48, help="hash blocks kept per prompt (its prefix)")
    p.add_argument("--output-scale", type=float, default=0.03)
    p.add_argument("--max-output", type=int, default=16)
    p.add_argument("--time-scale", type=float, default=4.0, help="arrival times x this (> 1: slower)")
    p.add_argument("--kv-blocks", type=int, default=2048, help="engine.num_kv_blocks per worker")
    p.add_argument("--modes", nargs="+", default=["colocated", "disaggregated"], choices=["colocated", "disaggregated"])
    p.add_argument(
        "--routing",
        nargs="+",
        default=["cache-aware", "load"],
        choices=["cache-aware", "load"],
        help="routing with the cache on (server.cache_aware_routing); off is always by load",
    )
    p.add_argument(
        "--max-local-prefill",
        type=int,
        default=256,
        metavar="TOKENS",
        help="server.max_local_prefill_tokens: a next turn adding at most this many tokens to what its decode "
        "worker holds is prefilled there (disaggregated, cache on); 0: always on the prefill worker",
    )
    args = p.parse_args(argv)
    if min(args.requests, args.block_tokens, args.max_blocks, args.conversations) < 1 or args.time_scale <= 0:
        p.error("--requests, --conversations, --block-tokens, --max-blocks must be >= 1 and --time-scale > 0")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
