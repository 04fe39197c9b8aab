"""StepLoop: steps an engine-owning core on one executor thread and keeps its outputs for poll().

The decode and the colocated worker each own one (decode_workers/worker.py,
decode_workers/colocated_worker.py); the core is a DecodeCore or a ColocatedCore.

    call(fn, ...) ── every call into the core runs on the one executor thread, so the core is
                     never touched concurrently; the event loop stays free to answer calls
    kick()        ── there is work: start the loop if it is not running, wake it
    loop:  core.has_work() ? core.step() ──▶ outbox : sleep until kick()
    poll(t)       ── the outbox's step messages (each step's StepOutputs form one), waiting up
                     to t for one
    stop(close)   ── the loop cancelled, `close` run on the thread (after a step still running),
                     the thread ended; nothing is called after it

An exception that escapes a step is a fault of the worker, not of one request (the engine fails
a bad request by itself): the loop dies and `failed` says so. From then on `check()` raises
WorkerLoopDied; poll() first hands out what was produced before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from engine.errors import WorkerLoopDied
from engine.kv_cache import CacheEvents
from engine.llm_engine import LLMEngine
from engine.sequence import SamplingParams, StepOutput
from engine.worker_api import WorkerInfo, WorkerReady, WorkerStatus

log = logging.getLogger(__name__)


class SteppedCore(Protocol):
    def has_work(self) -> bool: ...

    def step(self) -> list[StepOutput]: ...


class StepLoop:
    def __init__(self, core: SteppedCore, name: str) -> None:
        """name: the worker as log lines and WorkerLoopDied name it, e.g. "decode worker d-0"."""
        self.core = core
        self.name = name
        self.failed: str | None = None  # why the loop died; then check() raises WorkerLoopDied
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-loop")
        self._outbox: list[list[StepOutput]] = []
        self._has_output = asyncio.Event()
        self._has_work = asyncio.Event()
        self._task: asyncio.Task | None = None

    def check(self) -> None:
        if self.failed is not None:
            raise WorkerLoopDied(self.failed)

    async def call(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._has_work.set()

    async def _run(self) -> None:
        try:
            while True:
                if not self.core.has_work():
                    self._has_work.clear()
                    await self._has_work.wait()
                    continue
                outs = await self.call(self.core.step)
                if outs:
                    self._outbox.append(outs)
                    self._has_output.set()
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("the step loop of %s died", self.name)
            self.failed = f"the step loop of {self.name} died"
            self._has_output.set()  # the router's poll takes what was produced, then hears of the death

    async def poll(self, timeout_s: float) -> list[list[StepOutput]]:
        if not self._outbox:
            self.check()
            try:
                await asyncio.wait_for(self._has_output.wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
        out, self._outbox = self._outbox, []
        self._has_output.clear()
        return out

    async def stop(self, close: Callable[[], None]) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.call(close)
        self._executor.shutdown(wait=False)
        self._has_output.set()  # a poll still waiting returns (empty) at once


class SteppedWorker:
    """What the decode and the colocated worker share: a core stepped by a StepLoop, and the
    `Worker` protocol's calls answered from it (subclasses add their role's verbs and `ready`).
    `self.core` has `engine`, `layout`, `submit(...)`, `cancel(request_id)`, `idle()` and `close()`."""

    def __init__(self, info: WorkerInfo, core, what: str) -> None:
        self.worker_id = info.worker_id
        self.info = info
        self.core = core
        self.loop = StepLoop(core, what)

    @property
    def failed(self) -> str | None:
        """Why the step loop died (None while it runs); then every call raises WorkerLoopDied."""
        return self.loop.failed

    async def ready(self) -> WorkerReady:
        self.loop.check()
        return WorkerReady(self.info, self.core.layout)

    async def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        images: tuple[bytes, ...] = (),
        resume: tuple[int, int] | None = None,
        tenant: str = "",
        cache_salt: str = "",
    ) -> None:
        """A whole request, prefilled and decoded here: a colocated worker's every request (its
        images encoded here too), a decode worker's next turn on its cached history."""
        self.loop.check()
        await self.loop.call(
            self.core.submit, request_id, list(prompt_token_ids), sampling, list(images), resume, tenant, cache_salt
        )
        self.loop.kick()

    async def poll(self, timeout_s: float = 1.0) -> list[list[StepOutput]]:
        """Step messages produced since the last poll; waits up to timeout_s for one. A worker
        whose loop died hands out what it produced before, then raises WorkerLoopDied: the router
        treats its requests as a dead worker's (they fail, or are prefilled again elsewhere)."""
        return await self.loop.poll(timeout_s)

    async def cancel(self, request_id: str) -> bool:
        return await self.loop.call(self.core.cancel, request_id)

    async def status(self) -> WorkerStatus:
        self.loop.check()
        return await self.loop.call(engine_status, self.info, self.core.engine)

    async def cache_events(self) -> CacheEvents:
        self.loop.check()
        return await self.loop.call(self.core.engine.blocks.drain_events)

    async def idle(self) -> bool:
        return await self.loop.call(self.core.idle)

    async def stop(self) -> None:
        """Ends the loop and its thread and closes the core (and the KV cache it holds)."""
        await self.loop.stop(self.core.close)


def engine_status(info: WorkerInfo, engine: LLMEngine) -> WorkerStatus:
    """The status of a worker whose core steps `engine` (read on the loop's thread: call(...))."""
    return WorkerStatus(
        info.worker_id,
        info.role,
        info.node_id,
        True,
        queue_length=len(engine.scheduler.waiting),
        running=len(engine.scheduler.running),
        kv_blocks_used=engine.blocks.num_used_blocks,
        kv_blocks_total=engine.blocks.num_total_blocks,
        kv_blocks_cached=engine.blocks.num_cached_blocks,
        **({} if engine.selector is None else engine.selector.stats.status()),
    )
