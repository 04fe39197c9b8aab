"""The encode worker as a Ray async actor. It only delegates to EncodeService.

    actor = EncodeWorkerActor.options(num_cpus=1, resources={"encode": 1}).remote(model_dir="/models/llava")
    stats = await actor.encode.remote(transfer_id, images, descriptor)

Async, so several requests' encode() calls are in flight at once and their images share
vision forwards (see encoder.py); the forward itself runs on a worker thread. A RoleWorker
(cluster/role_worker.py) that can switch between encode and prefill serves its encode role
through this class too, built on the vision tower it already holds (`encoder_factory`).
"""

from __future__ import annotations

from collections.abc import Callable

import ray
import torch

from encode_workers.encoder import ImageEncoder
from encode_workers.service import EncodeService
from encode_workers.transfer import EncodeStats
from engine.worker_api import Role, worker_info
from kv_transfer.layout import TransferDescriptor


class EncodeWorker:
    def __init__(self, model_dir: str | None = None, *, encoder_factory: Callable[[], ImageEncoder] | None = None,
                 dtype: str = "float32", backend: str = "shm", cache_bytes: int = 512 << 20,
                 max_images_per_batch: int = 8, torch_threads: int | None = None, worker_id: str | None = None) -> None:
        """model_dir: a local LLaVA checkpoint; encoder_factory instead builds the encoder in the actor."""
        if (model_dir is None) == (encoder_factory is None):
            raise ValueError("give exactly one of model_dir and encoder_factory")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        kwargs = dict(backend=backend, cache_bytes=cache_bytes, max_images_per_batch=max_images_per_batch,
                      worker_id=worker_id)
        if model_dir is not None:
            self.service = EncodeService.from_model_dir(model_dir, getattr(torch, dtype), **kwargs)
        else:
            self.service = EncodeService(encoder_factory(), **kwargs)
        self.info = worker_info(self.service.worker_id, Role.ENCODE)
        self.inflight = 0              # encode() calls running: a role switch waits for 0

    async def encode(self, transfer_id: str, images: list[bytes], descriptor: TransferDescriptor,
                     epoch: int | None = None) -> EncodeStats:
        """epoch: checked by a RoleWorker; a plain encode worker never changes role."""
        self.inflight += 1
        try:
            return await self.service.encode(transfer_id, images, descriptor)
        finally:
            self.inflight -= 1

    async def ready(self):
        return self.info

    async def roles(self) -> tuple[Role, ...]:
        """The roles this worker can take: a plain encode worker holds only the vision tower."""
        return (Role.ENCODE,)

    async def idle(self) -> bool:
        return self.inflight == 0

    async def cancel(self, request_id: str) -> bool:
        return False                   # an encode call ends with its request's prefill

    async def stats(self) -> dict[str, object]:
        return self.service.stats()

    async def close(self) -> None:
        self.service.close()

    async def shutdown(self) -> None:
        self.service.close()


EncodeWorkerActor = ray.remote(EncodeWorker)
