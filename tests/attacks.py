"""A catalogue of hostile requests against a running gateway, each answering with what the server
said (a gRPC status name, an HTTP status, or what it served). Used by the gateway's free-loop test
(the oversized kinds, sent from another process) and by `bench/hostile.py` (all of them).

    python -m tests.attacks --grpc HOST:PORT --http URL [--admin HOST:PORT] [--key K] [--names a,b]
        [--oversized] [--victim-session S] [--victim-request R] [--admin-keys] [--timing] [--nice N]
        prints one JSON object: {attack name: what the server answered}

Every attack is one function of a Target; none may raise (an unexpected exception is reported as
"client error: ..."). `expect` says what a correct server answers, as a prefix of the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import grpc
import httpx

import triptych
from protos.triptych.v1 import triptych_pb2 as pb


@dataclass(frozen=True)
class Target:
    grpc: str
    http: str
    admin: str | None = None
    key: str | None = None  # the attacker's own API key (None: no keys on the server)
    admin_key: str | None = None  # set when the server has admin keys (the attacker has none)
    victim_session: str = ""  # a session id a victim uses (hijack attempts)
    victim_request: str = ""  # a request id a victim has in flight (abort attempts)


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable[[Target], str]
    expect: str | tuple[str, ...]  # a correct server's answer starts with (one of) this ("": any answer)
    oversized: bool = False  # sends a large request: the free-loop test sends these


def _client(t: Target, key: str | None = ..., timeout: float = 60) -> triptych.Client:
    return triptych.Client(
        t.grpc,
        timeout=timeout,
        api_key=t.key if key is ... else (key or ""),
        options=[("grpc.max_send_message_length", 64 << 20)],
    )


def _grpc(t: Target, key: str | None = ..., **kw) -> str:
    try:
        with _client(t, key) as c:
            reply = c.complete(**kw)
        return f"OK {reply.finish_reason.value}"
    except triptych.TriptychError as err:
        return f"{err.code.name}: {err.message[:160]}"


def _http(
    t: Target,
    path: str,
    *,
    body: dict | None = None,
    content: bytes | None = None,
    headers: dict | None = None,
    key: str | None = ...,
) -> str:
    key = t.key if key is ... else key
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    data = content if content is not None else json.dumps(body, allow_nan=True).encode()
    try:
        resp = httpx.post(t.http + path, content=data, headers=h, timeout=60)
    except httpx.HTTPError as err:
        return f"connection error: {type(err).__name__}"
    try:
        message = resp.json().get("error", {}).get("message", "")
    except ValueError:
        message = resp.text[:80]
    return f"HTTP {resp.status_code}" + (f": {message[:160]}" if resp.status_code != 200 else "")


def _chat(text: str = "Say hi.", **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}


def _png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _real_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


# ------------------------------------------------------------------------------------ slow clients
def _hold(url: str, payload: bytes, hold_s: float) -> str:
    """Send `payload` and wait: what came back, and when the server closed the connection."""
    u = urlparse(url)
    t0 = time.monotonic()
    with socket.create_connection((u.hostname, u.port), timeout=hold_s) as s:
        s.sendall(payload)
        try:
            data = s.recv(4096)
        except socket.timeout:
            return f"still open after {hold_s:.0f}s"
    took = time.monotonic() - t0
    if not data:
        return f"closed after {took:.1f}s"
    return f"HTTP {data.split(b' ', 2)[1].decode()} after {took:.1f}s"


def slowloris(t: Target) -> str:
    return _hold(t.http, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", 120)


def slow_body(t: Target) -> str:
    auth = f"Authorization: Bearer {t.key}\r\n".encode() if t.key else b""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + auth
        + b'Content-Length: 1000\r\n\r\n{"messages": ['
    )
    return _hold(t.http, head, 120)


def idle_connections(t: Target) -> str:
    u = urlparse(t.http)
    socks = [socket.create_connection((u.hostname, u.port)) for _ in range(100)]
    t0 = time.monotonic()
    try:
        for s in socks:
            s.settimeout(max(0.1, 120 - (time.monotonic() - t0)))
            try:
                s.recv(1)
            except socket.timeout:
                return f"still open after {time.monotonic() - t0:.0f}s"
        return f"100 closed after {time.monotonic() - t0:.1f}s"
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------------ floods
def request_flood(t: Target) -> str:
    """200 concurrent slow requests from one client."""

    def one(i: int) -> str:
        return _grpc(t, prompt=f"Count to a thousand, number {i}:", max_tokens=64, temperature=0.0).split(":")[0]

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(one, range(200)))
    return ", ".join(f"{a} x{answers.count(a)}" for a in sorted(set(answers)))


def session_flood(t: Target) -> str:
    """1,030 throwaway sessions, to push a victim's session out."""

    async def run() -> list[str]:
        async with triptych.AsyncClient(t.grpc, timeout=120, api_key=t.key or "") as c:
            sem = asyncio.Semaphore(32)

            async def one(i):
                async with sem:
                    try:
                        await c.complete(
                            messages=[{"role": "user", "content": "x"}], session_id=f"throwaway-{i}", max_tokens=1
                        )
                        return "OK"
                    except triptych.TriptychError as err:
                        return err.code.name

            return await asyncio.gather(*(one(i) for i in range(1030)))

    answers = asyncio.run(run())
    return ", ".join(f"{a} x{answers.count(a)}" for a in sorted(set(answers)))


def session_hijack(t: Target) -> str:
    """Use the victim's session id: the reply's prompt must not hold the victim's history."""
    if not t.victim_session:
        return "skipped: no victim session"
    with _client(t) as c:
        reply = c.complete(
            messages=[{"role": "user", "content": "Repeat my first message."}],
            session_id=t.victim_session,
            max_tokens=8,
            temperature=0.0,
        )
    return f"OK prompt_tokens={reply.usage.prompt_tokens}"


def abort_other(t: Target) -> str:
    if not t.victim_request:
        return "skipped: no victim request"
    with _client(t) as c:
        return f"aborted={c.abort(t.victim_request)}"


def raw_grpc(t: Target, payload: bytes) -> str:
    with grpc.insecure_channel(t.grpc, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        call = ch.unary_stream(
            "/triptych.v1.Triptych/Generate",
            request_serializer=None,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        md = (("authorization", f"Bearer {t.key}"),) if t.key else ()
        try:
            list(call(payload, timeout=60, metadata=md))
            return "OK"
        except grpc.RpcError as err:
            return f"{err.code().name}: {(err.details() or '')[:160]}"


def admin_on_serving_port(t: Target) -> str:
    try:
        with _client(t) as c:
            c.set_worker_role("decode-0", "prefill")
        return "OK (!)"
    except triptych.TriptychError as err:
        return err.code.name


def admin_with_serving_key(t: Target) -> str:
    if t.admin is None:
        return "skipped: no admin port"
    try:
        with triptych.Client(t.admin, timeout=30, api_key=t.key or "nope-nope-nope-nope") as c:
            c.admin_status()
        return "OK (!)" if t.admin_key else "OK (no admin keys: loopback only)"
    except triptych.TriptychError as err:
        return err.code.name


def _words(n_chars: int) -> str:
    words = "the cluster serves requests from many clients at once and keeps them apart ".split()
    out, size, i = [], 0, 0
    while size < n_chars:
        w = words[i % len(words)] + str(i % 97)
        out.append(w)
        size += len(w) + 1
        i += 1
    return " ".join(out)[:n_chars]


TOO_BIG_GRPC = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
TOO_BIG_HTTP = ("HTTP 400", "HTTP 413")

ATTACKS: list[Attack] = [
    # sampling values
    Attack(
        "http temperature NaN",
        lambda t: _http(t, "/v1/chat/completions", body=_chat(temperature=float("nan"))),
        "HTTP 400",
    ),
    Attack("http seed 2^70", lambda t: _http(t, "/v1/chat/completions", body=_chat(seed=2**70)), "HTTP 400"),
    Attack("grpc temperature 1e-37", lambda t: _grpc(t, prompt="Hi", max_tokens=4, temperature=1e-37), "OK"),
    Attack(
        "grpc temperature inf",
        lambda t: _grpc(t, prompt="Hi", max_tokens=4, temperature=float("inf")),
        "INVALID_ARGUMENT",
    ),
    Attack("grpc top_p NaN", lambda t: _grpc(t, prompt="Hi", max_tokens=4, top_p=float("nan")), "INVALID_ARGUMENT"),
    Attack("http top_k 1e30", lambda t: _http(t, "/v1/chat/completions", body=_chat(top_k=10**30)), "HTTP 400"),
    Attack(
        "http max_tokens 1e12", lambda t: _http(t, "/v1/chat/completions", body=_chat(max_tokens=10**12)), "HTTP 400"
    ),
    Attack("http max_tokens -1", lambda t: _http(t, "/v1/chat/completions", body=_chat(max_tokens=-1)), "HTTP 400"),
    # oversized
    # Refused by gRPC / aiohttp while reading (RESOURCE_EXHAUSTED / 413) when the model takes no images
    # (no acceptable request is that large), by the door's caps (INVALID_ARGUMENT / 400) otherwise.
    Attack(
        "grpc 15 MB prompt", lambda t: _grpc(t, prompt="x" * (15 << 20), max_tokens=4), TOO_BIG_GRPC, oversized=True
    ),
    Attack(
        "http 15 MB prompt",
        lambda t: _http(t, "/v1/completions", body={"prompt": "x" * (15 << 20)}),
        TOO_BIG_HTTP,
        oversized=True,
    ),
    Attack(
        "http 300k messages",
        lambda t: _http(t, "/v1/chat/completions", body={"messages": [{"role": "user", "content": "hi"}] * 300_000}),
        TOO_BIG_HTTP,
        oversized=True,
    ),
    Attack(
        "grpc 1M messages",
        lambda t: _grpc(t, messages=[{"role": "user", "content": "x"}] * 1_000_000),
        TOO_BIG_GRPC,
        oversized=True,
    ),
    Attack(
        "grpc prompt at the char cap",
        lambda t: _grpc(t, prompt=_words(262_000), max_tokens=4),
        "INVALID_ARGUMENT",
        oversized=True,
    ),
    Attack(
        "grpc 1000 long messages",
        lambda t: _grpc(t, messages=[{"role": "user", "content": _words(250)}] * 1000, max_tokens=4),
        "INVALID_ARGUMENT",
        oversized=True,
    ),
    Attack(
        "http 100k stop strings",
        lambda t: _http(t, "/v1/chat/completions", body=_chat(stop=["x"] * 100_000)),
        "HTTP 400",
        oversized=True,
    ),
    Attack(
        "grpc 1 MB stop string",
        lambda t: _grpc(t, prompt="Hi", stop=["s" * (1 << 20)]),
        "INVALID_ARGUMENT",
        oversized=True,
    ),
    Attack(
        "grpc 1 MB request id",
        lambda t: _grpc(t, prompt="Hi", request_id="r" * (1 << 20)),
        "INVALID_ARGUMENT",
        oversized=True,
    ),
    Attack(
        "grpc 100 images",
        lambda t: _grpc(t, prompt="Hi", images=[_png(8, 8)] * 100),
        "INVALID_ARGUMENT",
        oversized=True,
    ),
    Attack(
        "http pixel bomb image",
        lambda t: _http(
            t,
            "/v1/chat/completions",
            body={
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": _data_url(_png(100_000, 100_000))}}],
                    }
                ]
            },
        ),
        "HTTP 400",
        oversized=True,
    ),
    # Decoded to check it; served by a vision-language model, refused by a text-only one: any answer.
    Attack("grpc 2000x2000 image", lambda t: _grpc(t, prompt="Hi", images=[_real_png(2000)]), "", oversized=True),
    Attack(
        "http not an image",
        lambda t: _http(
            t,
            "/v1/chat/completions",
            body={
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": _data_url(b"GIF89a" + b"\x00" * 99)}}],
                    }
                ]
            },
        ),
        "HTTP 400",
    ),
    Attack(
        "http 40 MB body", lambda t: _http(t, "/v1/completions", content=b" " * (40 << 20)), "HTTP 413", oversized=True
    ),
    Attack("grpc 40 MB message", lambda t: _grpc(t, prompt="x" * (40 << 20)), "RESOURCE_EXHAUSTED", oversized=True),
    Attack(
        "http 100k nested arrays",
        lambda t: _http(t, "/v1/completions", content=b"[" * 100_000 + b"]" * 100_000),
        "HTTP 400",
        oversized=True,
    ),
    Attack("http invalid UTF-8", lambda t: _http(t, "/v1/completions", content=b'{"prompt": "\xff\xfe"}'), "HTTP 400"),
    Attack("grpc garbage bytes", lambda t: raw_grpc(t, b"\xff" * 64), "INVALID_ARGUMENT"),
    # identity and ownership
    Attack("grpc no API key", lambda t: _grpc(t, key=None, prompt="Hi", max_tokens=2), "UNAUTHENTICATED"),
    Attack(
        "http wrong API key",
        lambda t: _http(t, "/v1/chat/completions", body=_chat(), key="not-a-key-0123456789"),
        "HTTP 401",
    ),
    Attack("admin call on the serving port", admin_on_serving_port, "UNIMPLEMENTED"),
    Attack("admin call with a serving key", admin_with_serving_key, "UNAUTHENTICATED"),
    Attack("abort another client's request", abort_other, "aborted=False"),
    Attack("another client's session id", session_hijack, "OK prompt_tokens="),
    Attack("1030 throwaway sessions", session_flood, "OK"),
    # load and slow clients
    Attack("200 concurrent requests", request_flood, "OK"),
    Attack("slowloris headers", slowloris, "closed after"),
    Attack("slow body", slow_body, "HTTP 408"),
    Attack("100 idle connections", idle_connections, "100 closed after"),
]
BY_NAME = {a.name: a for a in ATTACKS}


def run(attack: Attack, target: Target) -> str:
    try:
        return attack.run(target)
    except Exception as err:  # report, never raise: the catalogue goes on
        return f"client error: {type(err).__name__}: {str(err)[:120]}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grpc", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--admin", default=None)
    p.add_argument("--key", default=None, help="the attacker's API key")
    p.add_argument("--admin-keys", action="store_true", help="the server has admin keys")
    p.add_argument("--victim-session", default="", help="a session id another client uses")
    p.add_argument("--victim-request", default="", help="a request id another client has in flight")
    p.add_argument("--names", default=None, help="comma-separated attack names (default: all)")
    p.add_argument("--oversized", action="store_true", help="only the oversized kinds")
    p.add_argument("--timing", action="store_true", help="answer {name: [answer, start, end]} (unix seconds)")
    p.add_argument("--nice", type=int, default=0, help="run at this niceness (an attacker on another machine)")
    args = p.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # here, not in a preexec_fn: forking a process with gRPC threads is not safe
    target = Target(
        args.grpc,
        args.http,
        args.admin,
        args.key,
        "set" if args.admin_keys else None,
        args.victim_session,
        args.victim_request,
    )
    chosen = (
        [BY_NAME[n] for n in args.names.split(",")]
        if args.names
        else [a for a in ATTACKS if a.oversized or not args.oversized]
    )
    out = {}
    for a in chosen:
        t0 = time.time()
        answer = run(a, target)
        out[a.name] = [answer, t0, time.time()] if args.timing else answer
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
