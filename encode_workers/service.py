"""An encode worker's logic, without Ray: encode a shard of images and send the features.

    encode(shard transfer id, images, descriptor)
      1. connect the sender to the prefill worker's transfer (layout and version checked)
      2. submit every image to the batcher (cache first)
      3. as each image's features are ready, send_payload("image.<i>")   (streamed)
      4. finish() — the receiver sees DONE; on any error abort() — it sees CANCELLED

Senders are made per receiver layout (the descriptor carries it) for the configured backend.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from encode_workers.cache import EmbeddingCache
from encode_workers.encoder import EncodeBatcher, ImageEncoder
from encode_workers.transfer import EncodeStats
from kv_transfer.base import KVSender
from kv_transfer.layout import TransferDescriptor, compat_hash
from kv_transfer.registry import get_backend


class EncodeService:
    def __init__(
        self,
        encoder: ImageEncoder,
        *,
        backend: str = "shm",
        cache_bytes: int = 512 << 20,
        max_images_per_batch: int = 8,
        send_timeout_s: float = 60.0,
        worker_id: str | None = None,
    ) -> None:
        self.backend = get_backend(backend)
        self.encoder = encoder
        self.cache = EmbeddingCache(cache_bytes)
        self.batcher = EncodeBatcher(encoder, self.cache, max_images_per_batch)
        self.send_timeout_s = send_timeout_s
        self.worker_id = worker_id or f"encode-{os.getpid()}"
        self._senders: dict[str, KVSender] = {}  # receiver layout hash → sender

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> "EncodeService":
        """Load only the vision tower + projector of a local LLaVA checkpoint."""
        return cls(ImageEncoder.from_model_dir(model_dir, dtype), **kwargs)

    def _sender(self, desc: TransferDescriptor) -> KVSender:
        if desc.backend != self.backend.name:
            raise ValueError(
                f"descriptor is for transport {desc.backend!r}; this encode worker uses {self.backend.name!r}"
            )
        key = compat_hash(desc.layout)
        if key not in self._senders:
            self._senders[key] = self.backend.Sender(desc.layout)
        return self._senders[key]

    async def encode(self, transfer_id: str, images: list[bytes], desc: TransferDescriptor) -> EncodeStats:
        start = time.perf_counter()
        if desc.meta.request_id != transfer_id:
            raise ValueError(f"descriptor is for {desc.meta.request_id!r}, not {transfer_id!r}")
        if len(desc.meta.payloads) != len(images):
            raise ValueError(f"{transfer_id}: {len(images)} images but the receiver expects {len(desc.meta.payloads)}")
        sender = self._sender(desc)
        sender.connect(desc)
        try:
            futures, hits = self.batcher.submit(images)
            wait_start = time.perf_counter()
            for spec, fut in zip(desc.meta.payloads, futures):
                features = await fut
                sender.send_payload(transfer_id, spec.name, features.to(spec.torch_dtype))
            encode_s = time.perf_counter() - wait_start if hits < len(images) else 0.0
            sender.finish(transfer_id, timeout=self.send_timeout_s)
        except BaseException:
            sender.abort(transfer_id)
            raise
        return EncodeStats(transfer_id, self.worker_id, len(images), hits, encode_s, time.perf_counter() - start)

    def stats(self) -> dict[str, object]:
        return {
            "encoder_calls": self.encoder.calls,
            "images_encoded": self.encoder.images_encoded,
            "batch_sizes": list(self.batcher.batch_sizes),
            "cache": self.cache.stats(),
        }

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()
        self._senders.clear()
        self.batcher.close()
