"""`triptych demo [--config deploy/local.yaml]`: the main job on the embedded default.

    start the cluster + gateway in this process (free ports)
      ──▶ 3-turn conversation (one session_id) through the SDK over loopback gRPC, streamed
      ──▶ one /v1/chat/completions call over HTTP
      ──▶ a table of TTFT / TPOT / prefill / transfer / decode per request
      ──▶ gateway stop, router.shutdown() (no Ray left running)

The SDK client is blocking, so the conversation runs in a worker thread while the gateway keeps
serving on this process's event loop. `run_demo` is the in-process entry for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cluster.config import ConfigError, DeployConfig, load_config, parse_config

# Turns 2 and 3 only make sense with the earlier turns: the session is what answers them.
TURNS = (
    "My favorite color is blue. Reply with one short sentence.",
    "What is my favorite color?",
    "Name a fruit that has that color.",
)
HTTP_PROMPT = "Write one short sentence about the sea."
MAX_TOKENS = 48
SESSION_ID = "triptych-demo"

Out = Callable[..., Any]  # print-like: accepts end= and flush=


@dataclass(frozen=True)
class RequestRow:
    name: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # of prompt_tokens, found in a prefix cache (engine.prefix_caching)
    ttft_s: float
    tpot_s: float
    prefill_s: float
    transfer_s: float
    decode_s: float
    e2e_s: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="deploy YAML (default: the embedded default, i.e. deploy/local.yaml)",
    )
    parser.add_argument(
        "--address", default=None, metavar="RAY_ADDRESS", help="join this Ray cluster instead of starting a local one"
    )


def demo_config(config_path: str | None) -> DeployConfig:
    """The config with the gateway's ports set to 0, so the demo never collides with a server."""
    overrides = {"server.grpc_port": 0, "server.http_port": 0, "server.admin_port": 0}
    if config_path is None:
        return parse_config({"version": 1}, "<embedded default>", overrides)
    return load_config(config_path, overrides)


async def run_demo(config_path: str | None = None, out: Out = print, *, address: str | None = None) -> list[RequestRow]:
    """Run the whole demo; returns the table's rows. Everything started is stopped on return."""
    from cluster.serve import describe, start_serving, stop_serving
    from engine.envs import hf_offline

    hf_offline()
    config = demo_config(config_path)
    pools = ", ".join(f"{p.role.value} x{p.workers}" for p in config.active_pools())
    out(f"[1/4] starting the cluster from {config.source} ({config.mode.value}: {pools}) ...", flush=True)
    router, running = await start_serving(config, address, progress=out)
    try:
        out(describe(config, router, running), flush=True)
        out(
            f"[2/4] a {len(TURNS)}-turn conversation over gRPC (session {SESSION_ID!r}, greedy, "
            f"max_tokens={MAX_TOKENS}) ...",
            flush=True,
        )
        rows = await asyncio.to_thread(_conversation, running.grpc_target, out)
        out("[3/4] one request over the OpenAI-compatible HTTP API ...", flush=True)
        rows.append(await _http_request(running.http_url, router.model_info().name, out))
        out("[4/4] per-request timings (server-measured):", flush=True)
        out(format_table(rows), flush=True)
        return rows
    finally:
        await stop_serving(router, running, progress=out)
        out("demo finished; cluster shut down.", flush=True)


def _conversation(target: str, out: Out) -> list[RequestRow]:
    from triptych import Client

    rows = []
    with Client(target, timeout=300) as client:
        client.wait_ready(timeout=30)
        for i, text in enumerate(TURNS, 1):
            out(f"\nuser> {text}", flush=True)
            out("assistant> ", end="", flush=True)
            stream = client.chat(
                [{"role": "user", "content": text}], session_id=SESSION_ID, max_tokens=MAX_TOKENS, temperature=0.0
            )
            with stream:
                for chunk in stream:
                    out(chunk.text, end="", flush=True)
            final = stream.final
            out("" if final.finish_reason != "error" else f"  [failed: {final.error}]", flush=True)
            rows.append(
                _row(
                    f"gRPC turn {i}",
                    final.finish_reason.value,
                    final.usage.prompt_tokens,
                    final.usage.completion_tokens,
                    final.usage.cached_tokens,
                    asdict(final.timings),
                )
            )
    out("", flush=True)
    return rows


async def _http_request(base_url: str, model: str, out: Out) -> RequestRow:
    import aiohttp

    body = {
        "model": model,
        "messages": [{"role": "user", "content": HTTP_PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
    }
    out(f"POST {base_url}/v1/chat/completions  user> {HTTP_PROMPT}", flush=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async with session.post(f"{base_url}/v1/chat/completions", json=body) as resp:
            reply = await resp.json()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {reply.get('error', reply)}")
    choice = reply["choices"][0]
    out(f"assistant> {choice['message']['content']}\n", flush=True)
    usage = reply["usage"]
    return _row(
        "HTTP chat",
        choice["finish_reason"],
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
        reply.get("timings", {}),
    )


def _row(name: str, finish_reason: str, prompt_tokens: int, completion_tokens: int, cached: int, t: dict) -> RequestRow:
    keys = ("ttft_s", "tpot_s", "prefill_s", "transfer_s", "decode_s", "e2e_s")
    return RequestRow(
        name, finish_reason, prompt_tokens, completion_tokens, cached, **{k: float(t.get(k, 0.0)) for k in keys}
    )


def format_table(rows: list[RequestRow]) -> str:
    head = (
        "request",
        "finish",
        "in/out tok",
        "cached tok",
        "TTFT ms",
        "TPOT ms",
        "prefill ms",
        "transfer ms",
        "decode ms",
        "e2e ms",
    )
    lines = [head]
    for r in rows:
        ms = (r.ttft_s, r.tpot_s, r.prefill_s, r.transfer_s, r.decode_s, r.e2e_s)
        tok = f"{r.prompt_tokens}/{r.completion_tokens}"
        lines.append((r.name, r.finish_reason, tok, str(r.cached_tokens), *(f"{v * 1e3:.1f}" for v in ms)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def run(args: argparse.Namespace) -> int:
    try:
        demo_config(args.config)  # validate before anything starts
    except ConfigError as err:
        print(f"triptych demo: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_demo(args.config, address=args.address))
    except KeyboardInterrupt:
        print("\ntriptych demo: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"triptych demo: failed: {err}", file=sys.stderr)
        return 1
    return 0
