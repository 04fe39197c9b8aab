"""Drive an asyncio router from synchronous tests (one event loop on a background thread), and the
leak checks every cluster test ends with."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from cluster.router_api import ChatMessage, FinalEvent, GenerateInput, TokenEvent
from engine.sequence import SamplingParams
from kv_transfer.segment import held_segments, orphaned_segments


@dataclass
class Result:
    token_ids: list[int]
    final: FinalEvent


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def collect(router, request: GenerateInput, first_token: asyncio.Event | None = None) -> Result:
    """The request's tokens and final event; `first_token` is set when its first token arrives."""
    tokens: list[int] = []
    final = None
    async for ev in router.generate(request):
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
            if first_token is not None:
                first_token.set()
        else:
            final = ev
    return Result(tokens, final)


def chat_request(rid: str, messages: list[dict], max_tokens: int, **kw) -> GenerateInput:
    return GenerateInput(
        rid,
        SamplingParams(max_tokens=max_tokens),
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages),
        **kw,
    )


async def run_all(router, requests: list[GenerateInput]) -> list[Result]:
    return await asyncio.gather(*(collect(router, r) for r in requests))


def assert_no_leaks(loop: LoopThread, router) -> None:
    """Every live worker holds no request and no KV block; no process keeps shared memory of one
    that ended (a sender lets go of a killed receiver's cache within kv_transfer/shm.py WATCH_S).

    (A live decode worker owns its KV cache and control segments for its whole life; requests
    create none, so after shutdown `assert_no_segments()` finds nothing at all.)"""
    assert loop.run(router.wait_idle(30)), "KV blocks or requests still held after the test"
    deadline = time.monotonic() + 10
    while orphaned_segments() and time.monotonic() < deadline:  # a killed worker takes a moment to end
        time.sleep(0.2)
    assert not orphaned_segments(), f"shared memory of ended processes still held: {orphaned_segments()}"


def assert_no_segments(timeout_s: float = 15.0) -> None:
    """After shutdown no process on this host holds any segment: all that shared memory is freed
    (the workers' processes may take a moment to end)."""
    deadline = time.monotonic() + timeout_s
    while held_segments() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not held_segments(), f"shared memory still held after shutdown: {held_segments()}"
