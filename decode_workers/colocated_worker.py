"""ColocatedWorker: the colocated role's worker (engine/worker_api.py `Worker`), hosted by the
worker actor (cluster/worker_actor.py). An asyncio front of ColocatedCore; it only delegates.

`submit()` queues a whole request; the StepLoop steps the engine on its one executor thread and
the router long-polls the step messages, as from a decode worker.
"""

from __future__ import annotations

from decode_workers.colocated_core import ColocatedCore, ColocatedOptions
from decode_workers.step_loop import StepLoop, engine_status
from encode_workers.inproc import InProcessEncoder
from engine.llm_engine import LoadedModel
from engine.sequence import SamplingParams, StepOutput
from engine.worker_api import Role, WorkerReady, WorkerStatus, worker_info


class ColocatedWorker:
    def __init__(
        self,
        worker_id: str,
        options: ColocatedOptions,
        loaded: LoadedModel,
        image_encoder: InProcessEncoder | None = None,
    ) -> None:
        """loaded / image_encoder: weights already in this process (as PrefillWorker's)."""
        self.worker_id = worker_id
        self.info = worker_info(worker_id, Role.COLOCATED)
        self.core = ColocatedCore(options, loaded, image_encoder)
        self.loop = StepLoop(self.core, f"colocated worker {worker_id}")

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
    ) -> None:
        """The whole request (prefill and decode) runs here; images are encoded here too."""
        self.loop.check()
        await self.loop.call(
            self.core.submit, request_id, list(prompt_token_ids), sampling, list(images), resume, tenant
        )
        self.loop.kick()

    async def poll(self, timeout_s: float = 1.0) -> list[list[StepOutput]]:
        """As DecodeWorker.poll."""
        return await self.loop.poll(timeout_s)

    async def cancel(self, request_id: str) -> bool:
        return await self.loop.call(self.core.cancel, request_id)

    async def status(self) -> WorkerStatus:
        self.loop.check()
        return await self.loop.call(engine_status, self.info, self.core.engine)

    async def idle(self) -> bool:
        return await self.loop.call(self.core.idle)

    async def stop(self) -> None:
        await self.loop.stop(self.core.close)
