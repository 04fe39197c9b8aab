"""DecodeWorker: the decode role's worker (engine/worker_api.py `Worker`), hosted by the worker
actor (cluster/worker_actor.py). An asyncio front of DecodeCore; it only delegates.

Every call into the core runs on the StepLoop's one executor thread, so the core is never
touched concurrently; the event loop stays free to answer reserve / activate / poll while a step
computes. Outputs: each step's StepOutputs of all sequences form one message; `poll()` (long-poll
by the router) returns the messages produced since the last poll.
"""

from __future__ import annotations

from decode_workers.decode_core import DecodeCore, DecodeOptions
from decode_workers.step_loop import StepLoop, engine_status
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams, StepOutput
from engine.worker_api import Role, WorkerReady, WorkerStatus, worker_info
from kv_transfer.layout import TransferDescriptor


class DecodeWorker:
    def __init__(self, worker_id: str, options: DecodeOptions, loaded: LoadedModel) -> None:
        """loaded: weights already in this process (a role switch reuses them)."""
        self.worker_id = worker_id
        self.info = worker_info(worker_id, Role.DECODE)
        self.core = DecodeCore(options, loaded)
        self.loop = StepLoop(self.core, f"decode worker {worker_id}")

    @property
    def failed(self) -> str | None:
        """Why the step loop died (None while it runs); then every call raises WorkerLoopDied."""
        return self.loop.failed

    async def ready(self) -> WorkerReady:
        self.loop.check()
        return WorkerReady(self.info, self.core.layout)

    async def reserve(
        self, request_id: str, num_prompt_tokens: int, lease_s: float | None = None
    ) -> TransferDescriptor | None:
        self.loop.check()
        return await self.loop.call(self.core.reserve, request_id, num_prompt_tokens, lease_s)

    async def activate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        resume: tuple[int, int] | None = None,
    ) -> StepOutput:
        self.loop.check()
        out = await self.loop.call(self.core.activate, request_id, prompt_token_ids, first_token, sampling, resume)
        self.loop.kick()
        return out

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

    async def idle(self) -> bool:
        return await self.loop.call(self.core.idle)

    async def stop(self) -> None:
        """Closes the transfer receiver (and with it the KV cache it registered)."""
        await self.loop.stop(self.core.close)
