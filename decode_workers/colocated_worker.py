"""ColocatedWorker: the colocated role's worker (engine/worker_api.py `Worker`), hosted by the
worker actor (cluster/worker_actor.py). An asyncio front of ColocatedCore; it only delegates.

`submit()` queues a whole request; the StepLoop steps the engine on its one executor thread and
the router long-polls the step messages, as from a decode worker.
"""

from __future__ import annotations

from decode_workers.colocated_core import ColocatedCore, ColocatedOptions
from decode_workers.step_loop import SteppedWorker
from encode_workers.inproc import InProcessEncoder
from engine.llm_engine import LoadedModel
from engine.tensor_parallel import TPGroup
from engine.worker_api import Role, worker_info


class ColocatedWorker(SteppedWorker):
    def __init__(
        self,
        worker_id: str,
        options: ColocatedOptions,
        loaded: LoadedModel,
        image_encoder: InProcessEncoder | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        """loaded / image_encoder: weights already in this process (as PrefillWorker's); tp: the
        tensor-parallel group this worker's engine drives (engine/tensor_parallel.py)."""
        info = worker_info(worker_id, Role.COLOCATED)
        super().__init__(info, ColocatedCore(options, loaded, image_encoder, tp), f"colocated worker {worker_id}")
