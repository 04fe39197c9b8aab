"""Drive an asyncio router from synchronous tests: one event loop on a background thread."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from cluster.router_api import ChatMessage, FinalEvent, GenerateInput, TokenEvent
from engine.sequence import SamplingParams
from kv_transfer.segment import list_all_segments


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


async def collect(router, request: GenerateInput) -> Result:
    tokens: list[int] = []
    final = None
    async for ev in router.generate(request):
        if isinstance(ev, TokenEvent):
            tokens.extend(ev.token_ids)
        else:
            final = ev
    return Result(tokens, final)


def chat_request(rid: str, messages: list[dict], max_tokens: int, **kw) -> GenerateInput:
    return GenerateInput(rid, SamplingParams(max_tokens=max_tokens),
                         messages=tuple(ChatMessage(m["role"], m["content"]) for m in messages), **kw)


async def run_all(router, requests: list[GenerateInput]) -> list[Result]:
    return await asyncio.gather(*(collect(router, r) for r in requests))


def assert_no_leaks(loop: LoopThread, router) -> None:
    assert loop.run(router.wait_idle(30)), "KV blocks or requests still held after the test"
    assert not list_all_segments(), f"shared-memory segments left: {list_all_segments()}"
