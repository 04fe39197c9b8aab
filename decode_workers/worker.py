"""DecodeWorker: a Ray async actor around DecodeCore. It only delegates.

All calls into the core run on one executor thread, so the core is never touched concurrently;
the actor's event loop stays free to answer reserve / activate / poll while a step computes.
Outputs: each step's StepOutputs of all sequences form one message; `poll()` (long-poll by the
router) returns the messages produced since the last poll.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from decode_workers.decode_core import DecodeCore, DecodeOptions
from engine.errors import WorkerLoopDied
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams, StepOutput
from engine.worker_api import Role, WorkerStatus, setup_threads, worker_info

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, worker_id: str, model: str | None, options: DecodeOptions, num_threads: int = 1,
                 role: Role = Role.DECODE, loaded: LoadedModel | None = None, image_encoder=None) -> None:
        """loaded / image_encoder: weights already in this process (a role switch reuses them); else
        `model` (and the vision side, when options ask for in-process encoding) is loaded."""
        setup_threads(num_threads)
        self.worker_id = worker_id
        self.role = role
        self.info = worker_info(worker_id, role)
        self.core = DecodeCore(options, loaded or LoadedModel.load(model, options.engine.dtype), image_encoder)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-core")
        self._outbox: list[list[StepOutput]] = []
        self._has_output = asyncio.Event()
        self._has_work = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.failed: str | None = None   # why the step loop died; then every call raises WorkerLoopDied

    def _check(self) -> None:
        if self.failed is not None:
            raise WorkerLoopDied(self.failed)

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Step while there is work. The engine fails a bad request by itself (its sequence
        ends with an error); an exception that still escapes a step is a fault of the worker,
        not of one request: the worker reports itself failed (ready/status/poll raise
        WorkerLoopDied), so the router treats its requests as a dead worker's and the supervisor
        replaces it."""
        try:
            while True:
                if not self.core.has_work():
                    self._has_work.clear()
                    await self._has_work.wait()
                    continue
                outs = await self._call(self.core.step)
                if outs:
                    self._publish(outs)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("the step loop of %s died", self.worker_id)
            self.failed = f"the step loop of {self.role.value} worker {self.worker_id} died"
            self._has_output.set()   # the router's poll takes what was produced, then hears of the death

    def _publish(self, outs: list[StepOutput]) -> None:
        self._outbox.append(outs)
        self._has_output.set()

    # ------------------------------------------------------------ router-facing API
    async def ready(self):
        self._check()
        return self.info, self.core.layout

    async def reserve(self, request_id: str, num_prompt_tokens: int, lease_s: float | None = None):
        self._check()
        return await self._call(self.core.reserve, request_id, num_prompt_tokens, lease_s)

    async def activate(self, request_id: str, prompt_token_ids: list[int], first_token: int,
                       sampling: SamplingParams, resume: tuple[int, int] | None = None) -> StepOutput:
        self._check()
        out = await self._call(self.core.activate, request_id, prompt_token_ids, first_token, sampling, resume)
        self._ensure_loop()
        self._has_work.set()
        return out

    async def submit(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                     images: tuple[bytes, ...] = (), resume: tuple[int, int] | None = None, tenant: str = "") -> None:
        """Colocated role: the whole request (prefill and decode) runs here; images are encoded here too.
        resume: a re-prefilled request's earlier output (LLMEngine.add_request); tenant: who sent it."""
        self._check()
        if images:
            await self._call(self.core.submit_with_images, request_id, list(prompt_token_ids), sampling, list(images),
                             resume, tenant)
        else:
            await self._call(functools.partial(self.core.engine.add_request, list(prompt_token_ids), sampling,
                                               request_id, resume=resume, tenant=tenant))
        self._ensure_loop()
        self._has_work.set()

    async def cancel(self, request_id: str) -> bool:
        return await self._call(self.core.cancel, request_id)

    async def poll(self, timeout_s: float = 1.0) -> list[list[StepOutput]]:
        """Step messages produced since the last poll; waits up to timeout_s for one. A worker
        whose loop died hands out what it produced before, then raises WorkerLoopDied: the router
        treats its requests as a dead worker's (they fail, or are prefilled again elsewhere)."""
        if not self._outbox:
            self._check()
            try:
                await asyncio.wait_for(self._has_output.wait(), timeout_s)
            except asyncio.TimeoutError:
                return []
        out, self._outbox = self._outbox, []
        self._has_output.clear()
        return out

    async def status(self) -> WorkerStatus:
        self._check()

        def read():
            e = self.core.engine
            return WorkerStatus(self.worker_id, self.role, self.info.node_id, True,
                                queue_length=len(e.scheduler.waiting), running=len(e.scheduler.running),
                                kv_blocks_used=e.blocks.num_used_blocks, kv_blocks_total=e.blocks.num_total_blocks)
        return await self._call(read)

    async def idle(self) -> bool:
        return await self._call(self.core.idle)

    async def shutdown(self) -> None:
        await self._call(self.core.close)
