"""EncodeWorker: the encode role's worker (engine/worker_api.py `Worker`), hosted by the worker
actor (cluster/worker_actor.py). An asyncio front of EncodeService; it only delegates.

Async, so several requests' encode() calls are in flight at once and their images share vision
forwards (see encoder.py); the forward itself runs on a worker thread. The vision tower comes
from the actor: a plain encode worker loads only that (EncodeOptions.model_dir); a worker that
switches between encode and prefill builds its encode role on the tower it already holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from encode_workers.encoder import ImageEncoder
from encode_workers.service import EncodeService
from encode_workers.transfer import EncodeStats
from engine.kv_cache import CacheEvents
from engine.worker_api import Role, WorkerReady, WorkerStatus, worker_info
from kv_transfer.layout import TransferDescriptor


@dataclass(frozen=True)
class EncodeOptions:
    """The encode role: the LLaVA checkpoint its vision tower (+ projector) comes from and the
    encode service's settings."""

    model_dir: str
    dtype: str = "float32"
    backend: str = "shm"
    cache_bytes: int = 512 << 20
    max_images_per_batch: int = 8


class EncodeWorker:
    def __init__(self, worker_id: str, options: EncodeOptions, encoder: ImageEncoder) -> None:
        """encoder: the vision tower, already loaded (from options.model_dir, by the actor)."""
        self.service = EncodeService(
            encoder,
            backend=options.backend,
            cache_bytes=options.cache_bytes,
            max_images_per_batch=options.max_images_per_batch,
            worker_id=worker_id,
        )
        self.info = worker_info(worker_id, Role.ENCODE)
        self.inflight = 0  # encode() calls running: a role switch waits for 0

    async def encode(self, transfer_id: str, images: list[bytes], descriptor: TransferDescriptor) -> EncodeStats:
        self.inflight += 1
        try:
            return await self.service.encode(transfer_id, images, descriptor)
        finally:
            self.inflight -= 1

    async def stats(self) -> dict[str, object]:
        return self.service.stats()

    async def ready(self) -> WorkerReady:
        return WorkerReady(self.info, None)  # no KV cache

    async def status(self) -> WorkerStatus:
        return WorkerStatus(
            self.info.worker_id,
            Role.ENCODE,
            self.info.node_id,
            True,
            queue_length=self.inflight,
            running=self.inflight,
            kv_blocks_used=0,
            kv_blocks_total=0,
        )

    async def cache_events(self) -> CacheEvents:
        return CacheEvents()  # no KV cache

    async def idle(self) -> bool:
        return self.inflight == 0

    async def cancel(self, request_id: str) -> bool:
        return False  # an encode call ends with its request's prefill

    async def stop(self) -> None:
        """Closes the senders and the batcher's thread."""
        self.service.close()
