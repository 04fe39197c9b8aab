"""Hostile-client bench: ordinary clients keep chatting while an attacker sends every bad and
oversized request of tests/attacks.py (37 kinds).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.hostile [--seconds 60] [--clients 4] [--max-tokens 16]
        [--per-client-limit 64] [--attacker-nice 0] [--json out.json]

Starts `triptych serve` in its own process (the embedded SmolLM2, 1 prefill + 1 decode worker on a
local Ray, API keys for two ordinary clients, "alice" and "bob", and an attacker, "mallory", plus
an admin key; free loopback ports). Then:

1. calm: --clients closed-loop ordinary clients (half alice, half bob; short chats, greedy,
   --max-tokens) for --seconds; TTFT and TPOT per request, measured by the client;
2. alice starts a session with a secret in its first turn and a long request ("alice-long");
3. attack: the same ordinary load while `python -m tests.attacks` (another process, mallory's key)
   runs the catalogue, aimed at alice's session and request where it can be;
4. after: alice's next session turn must still carry her history; alice-long must have finished.

Prints, per attack, what the server answered and whether that is what a correct server answers;
then the ordinary clients' success rate and TTFT / TPOT p90 calm vs under attack, the server
process's RSS (the gateway and router; workers are Ray processes of their own) before and after,
and what is left held at the end: KV blocks in use on the workers and shared memory still held
for ended processes. Goals: 100% of ordinary requests succeed, p90 latencies within 2x, RSS back within 10%,
nothing left held.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import print_table, rss_kib

KEYS = {
    "alice": "alice-key-0123456789abcdef",
    "bob": "bob-key-0123456789abcdef00",
    "mallory": "mallory-key-0123456789abcd",
}
ADMIN_KEY = "ops-admin-key-0123456789ab"
SECRET = "The launch code is 7-4-1-9. Keep it secret."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the calm phase")
    p.add_argument("--clients", type=int, default=4, help="ordinary closed-loop clients (half alice, half bob)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--per-client-limit", type=int, default=64, help="server.limits.max_requests_per_client")
    p.add_argument("--ray-cpus", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--attacks", default=None, help="comma-separated attack names (default: the whole catalogue)")
    p.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="run the attacker's client process at this niceness (0-19): models an attacker on another machine, "
        "whose own CPU is not the server's; the gateway's and workers' work for its requests stays at full priority",
    )
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 32 or not 0 < args.seconds <= 900:
        p.error("--clients must be in [1, 32] and --seconds in (0, 900]")
    if not 0 <= args.attacker_nice <= 19:
        p.error("--attacker-nice must be in [0, 19]")
    return args


def rss_mib(pid: int) -> float:
    return rss_kib(pid)[0] / 1024


@dataclass
class Tally:
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    started: list[tuple[float, float]] = field(default_factory=list)  # (unix start, TTFT) per request
    phases: list[tuple[float, float, float]] = field(default_factory=list)  # server (queue_s, prefill_s, transfer_s)


async def ordinary_client(target: str, name: str, chats: list, args, tally: Tally, stop: asyncio.Event, i: int):
    import triptych

    async with triptych.AsyncClient(target, timeout=300, api_key=KEYS[name]) as client:
        n = i
        while not stop.is_set():
            chat = chats[n % len(chats)]
            n += 1
            t0, started = time.perf_counter(), time.time()
            first = last = None
            tokens = 0
            try:
                async for chunk in client.chat(
                    chat, max_tokens=args.max_tokens, temperature=0.0, request_id=f"{name}-{i}-{n}"
                ):
                    now = time.perf_counter()
                    if chunk.is_final:
                        if chunk.finish_reason.value not in ("stop", "length"):
                            raise RuntimeError(f"finished {chunk.finish_reason.value}: {chunk.error}")
                        tally.phases.append((chunk.timings.queue_s, chunk.timings.prefill_s, chunk.timings.transfer_s))
                        break
                    first = first or now
                    last = now
                    tokens += len(chunk.token_ids)
            except Exception as err:
                tally.failed[f"{type(err).__name__}: {str(err)[:80]}"] += 1
                continue
            tally.ok += 1
            tally.ttft.append(first - t0)
            tally.started.append((started, first - t0))
            if tokens > 1:
                tally.tpot.append((last - first) / (tokens - 1))


async def load(target: str, chats: list, args, until) -> Tally:
    """Ordinary clients until `until()` (an awaitable) completes."""
    tally, stop = Tally(), asyncio.Event()
    names = [("alice", "bob")[i % 2] for i in range(args.clients)]
    clients = [
        asyncio.ensure_future(ordinary_client(target, n, chats, args, tally, stop, i)) for i, n in enumerate(names)
    ]
    try:
        await until()
    finally:
        stop.set()
        await asyncio.gather(*clients)
    return tally


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else float("nan")


def start_server(tmp: Path, args) -> tuple[subprocess.Popen, dict]:
    (tmp / "api-keys").write_text("".join(f"{n}:{k}\n" for n, k in KEYS.items()))
    (tmp / "admin-keys").write_text(f"ops:{ADMIN_KEY}\n")
    config = {
        "version": 1,
        "ray": {"num_cpus": args.ray_cpus},
        "server": {
            # port 0: the server binds free ports itself and prints them (a port picked here
            # could be taken by one of Ray's processes before the server binds it)
            "grpc_port": 0,
            "http_port": 0,
            "admin_port": 0,
            "auth": {"api_keys_file": str(tmp / "api-keys"), "admin_keys_file": str(tmp / "admin-keys")},
            "limits": {"max_requests_per_client": args.per_client_limit},
        },
    }
    (tmp / "deploy.yaml").write_text(json.dumps(config))  # JSON is YAML
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "triptych.cli", "serve", "--config", str(tmp / "deploy.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 600
    while "Press Ctrl-C" not in (text := (tmp / "serve.log").read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"triptych serve did not start:\n{text[-3000:]}")
        time.sleep(0.5)
    found = {
        door: re.search(pattern, text, re.MULTILINE)
        for door, pattern in (
            ("grpc", r"^\s+gRPC\s+\S+:(\d+)\s"),
            ("http", r"^\s+HTTP\s+https?://\S+:(\d+)/v1"),
            ("admin", r"^\s+admin\s+\S+:(\d+)\s"),
        )
    }
    if not all(found.values()):
        proc.kill()
        raise RuntimeError(f"triptych serve did not say its ports:\n{text[-3000:]}")
    return proc, {door: int(m.group(1)) for door, m in found.items()}


async def main_async(args) -> dict:
    import triptych
    from kv_transfer.segment import held_segments, orphaned_segments
    from tests.prompts import chat_prompts

    tmp = Path(tempfile.mkdtemp(prefix="triptych-hostile-"))
    proc, ports = start_server(tmp, args)
    grpc_t, http_u, admin_t = (
        f"127.0.0.1:{ports['grpc']}",
        f"http://127.0.0.1:{ports['http']}",
        f"127.0.0.1:{ports['admin']}",
    )
    results: dict = {}
    try:
        from transformers import AutoTokenizer

        from engine import model_loader

        tokenizer = AutoTokenizer.from_pretrained(model_loader.local_dir(model_loader.resolve(None)))
        chats = chat_prompts(tokenizer, [20, 40, 60, 80, 120, 160])
        print(
            f"server pid {proc.pid}: gRPC {grpc_t}, HTTP {http_u}, admin {admin_t}; RSS {rss_mib(proc.pid):.0f} MiB",
            flush=True,
        )
        # Warm up (first requests load lazily), then the calm phase.
        await load(grpc_t, chats, args, lambda: asyncio.sleep(5))
        print(f"calm phase: {args.clients} ordinary clients for {args.seconds:.0f}s ...", flush=True)
        calm = await load(grpc_t, chats, args, lambda: asyncio.sleep(args.seconds))
        rss_before = rss_mib(proc.pid)

        alice = triptych.AsyncClient(grpc_t, timeout=600, api_key=KEYS["alice"])
        first = await alice.complete(
            messages=[{"role": "user", "content": SECRET}], session_id="alice-notes", max_tokens=8, temperature=0.0
        )
        long_stream = alice.generate(
            "Count slowly from one to one thousand:",
            max_tokens=200,
            ignore_eos=True,
            temperature=0.0,
            request_id="alice-long",
        )
        long_task = asyncio.ensure_future(_drain(long_stream))

        cmd = [
            sys.executable,
            "-m",
            "tests.attacks",
            "--grpc",
            grpc_t,
            "--http",
            http_u,
            "--admin",
            admin_t,
            "--key",
            KEYS["mallory"],
            "--admin-keys",
            "--victim-session",
            "alice-notes",
            "--victim-request",
            "alice-long",
            "--timing",
            "--nice",
            str(args.attacker_nice),
        ] + (["--names", args.attacks] if args.attacks else [])
        attack_out: dict = {}

        async def attack():
            t0 = time.monotonic()
            p = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"attacker failed: {err.decode()[-2000:]}")
            attack_out.update(json.loads(out))
            attack_out["_seconds"] = time.monotonic() - t0

        print("attack phase: the same load while the attacker runs the catalogue ...", flush=True)
        hot = await load(grpc_t, chats, args, attack)
        long_final = await long_task
        second = await alice.complete(
            messages=[{"role": "user", "content": "What did I tell you?"}],
            session_id="alice-notes",
            max_tokens=8,
            temperature=0.0,
        )
        await alice.close()
        await asyncio.sleep(5)
        rss_after = rss_mib(proc.pid)
        with triptych.Client(admin_t, timeout=30, api_key=ADMIN_KEY) as admin:
            status = admin.admin_status()
        kv_used = sum(w.kv_blocks_used for p in status.pools for w in p.workers)
        results = report(
            args,
            calm,
            hot,
            attack_out,
            rss_before,
            rss_after,
            kv_used,
            orphaned_segments(),
            len(held_segments()),
            first,
            second,
            long_final,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(
        f"server stopped; shared memory of ended processes still held after shutdown: {len(orphaned_segments())}, "
        f"triptych segments still held: {len(held_segments())}",
        flush=True,
    )
    return results


async def _drain(stream):
    final = None
    async for chunk in stream:
        if chunk.is_final:
            final = chunk
    return final


def report(
    args,
    calm: Tally,
    hot: Tally,
    attacks_out: dict,
    rss_before,
    rss_after,
    kv_used,
    stale,
    segments,
    first,
    second,
    long_final,
) -> dict:
    from tests.attacks import BY_NAME

    rows, wrong = [], 0
    seconds = attacks_out.pop("_seconds", 0.0)
    for name, (answer, t0, t1) in attacks_out.items():
        good = answer.startswith(BY_NAME[name].expect)
        wrong += not good
        during = [ttft for at, ttft in hot.started if t0 <= at <= t1]
        rows.append(
            [
                name,
                answer[:90],
                f"{t1 - t0:.1f}",
                "yes" if good else "NO",
                f"{max(during) * 1e3:.0f} ({len(during)})" if during else "-",
            ]
        )
    print(f"\n{len(attacks_out)} attacks in {seconds:.0f}s (attacker's client at niceness {args.attacker_nice}):")
    print_table(["attack", "server answered", "s", "as expected", "ordinary TTFT max ms (n)"], rows)
    hijack = attacks_out.get("another client's session id", ["", 0, 0])[0]
    print(
        f"\nalice's session: turn 1 prompt {first.usage.prompt_tokens} tokens; her turn 2 after the attack "
        f"{second.usage.prompt_tokens} tokens (history kept: {second.usage.prompt_tokens > first.usage.prompt_tokens}); "
        f"mallory's turn on the same id: {hijack}"
    )
    print(
        f"alice-long (mallory tried to abort it): {long_final.finish_reason.value}, "
        f"{long_final.usage.completion_tokens} tokens"
    )
    total = lambda t: t.ok + sum(t.failed.values())  # noqa: E731
    ms = lambda x: f"{x * 1e3:.0f}"  # noqa: E731
    print("\nordinary clients:")
    print_table(
        ["phase", "requests", "succeeded", "TTFT p50 ms", "TTFT p90 ms", "TPOT p50 ms", "TPOT p90 ms"],
        [
            [
                name,
                str(total(t)),
                f"{t.ok / max(1, total(t)):.1%}",
                ms(statistics.median(t.ttft)),
                ms(p90(t.ttft)),
                ms(statistics.median(t.tpot)),
                ms(p90(t.tpot)),
            ]
            for name, t in (("calm", calm), ("under attack", hot))
        ],
    )
    for phase, t in (("calm", calm), ("under attack", hot)):
        if t.phases:
            q, p, x = (statistics.mean(v) for v in zip(*t.phases))
            print(
                f"  {phase}: server-side means: queue {q * 1e3:.0f} ms, prefill {p * 1e3:.0f} ms, "
                f"exposed transfer {x * 1e3:.0f} ms"
            )
        for err, n in t.failed.items():
            print(f"  {phase} failure x{n}: {err}")
    print(
        f"\nserver RSS: {rss_before:.0f} MiB before the attack, {rss_after:.0f} MiB after "
        f"({(rss_after / rss_before - 1):+.1%}); KV blocks in use at the end: {kv_used}; shared memory of ended "
        f"processes still held: {len(stale)} (live workers' own segments: {segments})"
    )
    goals = {
        "attacks answered as expected": wrong == 0,
        "ordinary requests all succeed": not hot.failed and not calm.failed,
        "TTFT p90 within 2x": p90(hot.ttft) <= 2 * p90(calm.ttft),
        "TPOT p90 within 2x": p90(hot.tpot) <= 2 * p90(calm.tpot),
        "RSS back within 10%": rss_after <= 1.1 * rss_before,
        "nothing left held": kv_used == 0 and not stale,
        "session kept, not shared": second.usage.prompt_tokens > first.usage.prompt_tokens,
        "victim request not aborted": long_final.finish_reason.value == "length",
    }
    print("\ngoals: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()), flush=True)
    return {
        "attacks": {k: v[0] for k, v in attacks_out.items()},
        "calm": _t(calm),
        "attack": _t(hot),
        "rss_mib": [rss_before, rss_after],
        "kv_used": kv_used,
        "stale_segments": stale,
        "goals": goals,
    }


def _t(t: Tally) -> dict:
    return {"ok": t.ok, "failed": dict(t.failed), "ttft_p90": p90(t.ttft), "tpot_p90": p90(t.tpot)}


def main(argv=None) -> None:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
