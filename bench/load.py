"""Load test: concurrent streaming clients over gRPC (SDK) and HTTP (SSE) against a local deployment.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.load [--capacity 8] [--loads 1,3] [--seconds 30]
        [--max-tokens 16] [--prompt-tokens 60] [--deadline 30]

Starts what `triptych serve` starts (start_serving: local Ray, 1 prefill + 1 decode worker of the
embedded SmolLM2, gateway on loopback with free ports), with `server.max_queued_requests =
--capacity`. Then, for each load factor L in `--loads`, runs L x capacity closed-loop clients for
`--seconds` (half gRPC via triptych.AsyncClient, half HTTP via httpx streaming
/v1/chat/completions): each sends a chat, reads the stream to its end, and sends the next; a client
refused with RESOURCE_EXHAUSTED / 429 waits --retry-after seconds before trying again.

Prints, per load: requests served, errors by kind (RESOURCE_EXHAUSTED/429, DEADLINE/504, other),
TTFT and end-to-end latency percentiles of served requests, the peak number of requests the gateway
held in flight, and this process's peak RSS (sampled VmRSS during the run, and VmHWM). The gateway
and the clients share this process, so the RSS is an upper bound on the gateway's. The claim
checked: in-flight work is bounded by max_queued_requests, so memory does not grow with offered load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.common import print_table, rss_kib

MAX_CLIENTS = 256
MAX_SECONDS = 600


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacity", type=int, default=8, help="server.max_queued_requests (1x load = this many clients)")
    p.add_argument("--loads", default="1,3", help="comma-separated load factors (clients = factor x capacity)")
    p.add_argument("--seconds", type=float, default=30.0, help="duration of each load level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=60, help="about this many tokens per user message")
    p.add_argument("--deadline", type=float, default=30.0, help="per-request client deadline (s)")
    p.add_argument("--retry-after", type=float, default=0.2, help="client wait after RESOURCE_EXHAUSTED / 429")
    p.add_argument("--ray-cpus", type=int, default=3)
    args = p.parse_args(argv)
    args.loads = [float(x) for x in args.loads.split(",")]
    if not 1 <= args.capacity or max(args.loads) * args.capacity > MAX_CLIENTS:
        p.error(f"clients (capacity x load) must be between 1 and {MAX_CLIENTS}")
    if not 0 < args.seconds <= MAX_SECONDS:
        p.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    return args


@dataclass
class Tally:
    served: int = 0
    errors: Counter = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    def ok(self, ttft: float | None, e2e: float) -> None:
        self.served += 1
        if ttft is not None:
            self.ttft.append(ttft)
        self.e2e.append(e2e)


async def grpc_client(target: str, chats, args, tally: Tally, stop: float, seed: int) -> None:
    from triptych import AsyncClient
    from triptych.errors import DeadlineExceeded, ResourceExhausted
    from triptych.types import FinalChunk

    rng = random.Random(seed)
    async with AsyncClient(target, timeout=args.deadline) as client:
        while time.monotonic() < stop:
            t0, first = time.monotonic(), None
            try:
                final = None
                async with client.chat(rng.choice(chats), max_tokens=args.max_tokens, temperature=0) as stream:
                    async for chunk in stream:
                        if isinstance(chunk, FinalChunk):
                            final = chunk
                        elif first is None:
                            first = time.monotonic() - t0
                if final is None or final.error:
                    tally.errors["other" if final is None or "deadline" not in final.error else "deadline"] += 1
                else:
                    tally.ok(first, time.monotonic() - t0)
            except ResourceExhausted:
                tally.errors["resource_exhausted"] += 1
                await asyncio.sleep(args.retry_after)
            except DeadlineExceeded:
                tally.errors["deadline"] += 1
            except Exception as exc:  # noqa: BLE001 - a load test counts every failure
                tally.errors[f"other:{type(exc).__name__}"] += 1


async def http_client(base: str, chats, args, tally: Tally, stop: float, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=args.deadline) as http:
        while time.monotonic() < stop:
            t0, first = time.monotonic(), None
            body = {"messages": rng.choice(chats), "max_tokens": args.max_tokens, "temperature": 0, "stream": True}
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code == 429:
                        tally.errors["resource_exhausted"] += 1
                        await resp.aread()
                        await asyncio.sleep(args.retry_after)
                        continue
                    if resp.status_code == 504:
                        tally.errors["deadline"] += 1
                        continue
                    if resp.status_code != 200:
                        tally.errors[f"other:http{resp.status_code}"] += 1
                        continue
                    done, failed = False, None
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        obj = json.loads(data)
                        if "error" in obj:
                            failed = str(obj["error"])
                        elif first is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                            first = time.monotonic() - t0
                    if failed is not None or not done:
                        tally.errors["deadline" if failed and "deadline" in failed else "other"] += 1
                    else:
                        tally.ok(first, time.monotonic() - t0)
            except httpx.TimeoutException:
                tally.errors["deadline"] += 1
            except Exception as exc:  # noqa: BLE001
                tally.errors[f"other:{type(exc).__name__}"] += 1


async def run_level(running, chats, args, clients: int) -> dict:
    tally = Tally()
    stop = time.monotonic() + args.seconds
    peak = {"rss": 0, "inflight": 0}

    async def sample() -> None:
        while True:
            peak["rss"] = max(peak["rss"], rss_kib()[0])
            peak["inflight"] = max(peak["inflight"], len(running.gateway.in_flight))
            await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample())
    n_grpc = (clients + 1) // 2
    tasks = [grpc_client(running.grpc_target, chats, args, tally, stop, i) for i in range(n_grpc)]
    tasks += [http_client(running.http_url, chats, args, tally, stop, 1000 + i) for i in range(clients - n_grpc)]
    t0 = time.monotonic()
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t0
    sampler.cancel()
    return {
        "clients": clients,
        "tally": tally,
        "wall": wall,
        "peak_rss": peak["rss"],
        "hwm": rss_kib()[1],
        "peak_inflight": peak["inflight"],
    }


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"{v[min(len(v) - 1, int(q * len(v)))]:.2f}"


async def main_async(args) -> None:
    from cluster.config import parse_config
    from cluster.serve import start_serving, stop_serving
    from tests.prompts import chat_prompts

    config = parse_config(
        {
            "version": 1,
            "ray": {"num_cpus": args.ray_cpus},
            "server": {
                "host": "127.0.0.1",
                "grpc_port": 0,
                "http_port": 0,
                "max_queued_requests": args.capacity,
                "request_timeout_s": args.deadline,
            },
        },
        "bench.load",
    )
    router, running = await start_serving(config, progress=lambda *a: print(*a, flush=True))
    try:
        chats = chat_prompts(router.tokenizer, [args.prompt_tokens] * 8)
        rows = []
        for load in args.loads:
            clients = max(1, round(load * args.capacity))
            print(f"load {load:g}x: {clients} clients for {args.seconds:g}s ...", flush=True)
            r = await run_level(running, chats, args, clients)
            t: Tally = r["tally"]
            errs = Counter()
            for kind, n in t.errors.items():
                errs["other" if kind.startswith("other") else kind] += n
            rows.append(
                [
                    f"{load:g}x",
                    str(clients),
                    str(t.served),
                    f"{t.served / r['wall']:.2f}",
                    str(errs["resource_exhausted"]),
                    str(errs["deadline"]),
                    str(errs["other"]),
                    pct(t.ttft, 0.5),
                    pct(t.ttft, 0.9),
                    pct(t.ttft, 0.99),
                    pct(t.e2e, 0.5),
                    pct(t.e2e, 0.9),
                    pct(t.e2e, 0.99),
                    str(r["peak_inflight"]),
                    f"{r['peak_rss'] / 1024:.0f}",
                    f"{r['hwm'] / 1024:.0f}",
                ]
            )
            if any(k.startswith("other") for k in t.errors):
                print("  other errors:", {k: n for k, n in t.errors.items() if k.startswith("other")}, flush=True)
        print(
            f"\nmax_queued_requests={args.capacity}, max_tokens={args.max_tokens}, "
            f"~{args.prompt_tokens}-token prompts, {args.seconds:g}s per level, gRPC and HTTP clients half each"
        )
        print_table(
            [
                "load",
                "clients",
                "served",
                "req/s",
                "429/RE",
                "deadline",
                "other",
                "TTFT p50",
                "p90",
                "p99",
                "e2e p50",
                "p90",
                "p99",
                "peak inflight",
                "peak RSS MiB",
                "VmHWM MiB",
            ],
            rows,
        )
    finally:
        await stop_serving(router, running, progress=lambda *a: None)


def main(argv=None) -> None:
    args = parse_args(argv)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
