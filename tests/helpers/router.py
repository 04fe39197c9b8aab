"""Drive an asyncio router from synchronous tests (one event loop on a background thread), and the
leak checks every cluster test ends with."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from cluster.router_api import ChatMessage, FinalEvent, GenerateInput, TokenEvent
from engine.sequence import SamplingParams
from kv_transfer.segment import list_all_segments, stale_segments


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
    """Every live worker holds no request and no KV block; no segment outlives its process.

    (A live decode worker owns its KV cache and control segments for its whole life; requests
    create none, so after shutdown `assert_no_segments()` finds nothing at all.)"""
    assert loop.run(router.wait_idle(30)), "KV blocks or requests still held after the test"
    deadline = time.monotonic() + 10
    while stale_segments() and time.monotonic() < deadline:  # a killed worker's are reaped async
        time.sleep(0.1)
    assert not stale_segments(), f"shared-memory segments of dead processes left: {stale_segments()}"


def assert_no_segments() -> None:
    assert not list_all_segments(), f"shared-memory segments left after shutdown: {list_all_segments()}"
