"""DecodeWorker: the decode role's worker (engine/worker_api.py `Worker`), hosted by the worker
actor (cluster/worker_actor.py). An asyncio front of DecodeCore; it only delegates.

Every call into the core runs on the StepLoop's one executor thread, so the core is never
touched concurrently; the event loop stays free to answer reserve / activate / poll while a step
computes. Outputs: each step's StepOutputs of all sequences form one message; `poll()` (long-poll
by the router) returns the messages produced since the last poll.
"""

from __future__ import annotations

from decode_workers.decode_core import DecodeCore, DecodeOptions
from decode_workers.step_loop import SteppedWorker
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams, StepOutput
from engine.tensor_parallel import TPGroup
from engine.worker_api import Role, worker_info
from kv_transfer.layout import TransferDescriptor


class DecodeWorker(SteppedWorker):
    def __init__(self, worker_id: str, options: DecodeOptions, loaded: LoadedModel, tp: TPGroup | None = None) -> None:
        """loaded: weights already in this process (a role switch reuses them); tp: the
        tensor-parallel group this worker drives (DecodeCore)."""
        info = worker_info(worker_id, Role.DECODE)
        super().__init__(info, DecodeCore(options, loaded, tp), f"decode worker {worker_id}")

    async def reserve(
        self,
        request_id: str,
        num_prompt_tokens: int,
        lease_s: float | None = None,
        prompt_token_ids: list[int] | None = None,
        cache_salt: str = "",
        image_hashes: tuple[bytes, ...] = (),
    ) -> TransferDescriptor | None:
        self.loop.check()
        return await self.loop.call(
            self.core.reserve, request_id, num_prompt_tokens, lease_s, prompt_token_ids, cache_salt, image_hashes
        )

    async def activate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token: int,
        sampling: SamplingParams,
        resume: tuple[int, int] | None = None,
        cache_salt: str | None = "",
        image_hashes: tuple[bytes, ...] = (),
    ) -> StepOutput:
        self.loop.check()
        out = await self.loop.call(
            self.core.activate, request_id, prompt_token_ids, first_token, sampling, resume, cache_salt, image_hashes
        )
        self.loop.kick()
        return out
