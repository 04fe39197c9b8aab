"""Image encoding with cross-request batching and the embedding cache in front.

    encode(images) ─▶ key = sha256(model id, bytes)
                      ├─ cached ───────────────▶ features now (hit)
                      ├─ already queued/running ─▶ waits on that image's future (no 2nd forward)
                      └─ new: decode + preprocess (bad bytes fail this request only), enqueue
    drain task:  queue ─▶ take ≤ max_images_per_batch images (≤ max_tokens_per_batch tokens)
                        ─▶ one vision forward on a worker thread ─▶ cache + resolve futures

While a forward runs the event loop keeps admitting requests, so images that arrive meanwhile
form the next batch. `ImageEncoder.calls` counts vision forwards (tests assert cache hits skip it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from encode_workers.cache import EmbeddingCache, image_key
from engine.multimodal import ImageProcessor, VisionEncoder, load_vision_encoder


class ImageEncoder:
    """The compute: bytes → pixel values → features. Counts forwards and images encoded."""

    def __init__(self, vision: VisionEncoder, processor: ImageProcessor, model_id: str) -> None:
        self.vision = vision
        self.processor = processor
        self.model_id = model_id
        self.calls = 0
        self.images_encoded = 0

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "ImageEncoder":
        """Load only the vision tower + projector of a local LLaVA checkpoint."""
        vision = load_vision_encoder(model_dir, dtype)
        processor = ImageProcessor.from_config(vision.config, model_dir)
        return cls(vision, processor, model_id=str(Path(model_dir).resolve()))

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    def preprocess(self, image: bytes, index: int) -> torch.Tensor:
        """[3, S, S]; InvalidRequestError naming `index` for bytes that are not an image."""
        return self.processor.pixel_values(self.processor.decode(image, index))

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, S, S] → N owned tensors [num_image_tokens, H] (one forward)."""
        self.calls += 1
        self.images_encoded += pixel_values.shape[0]
        return [f.clone() for f in self.vision(pixel_values)]


@dataclass
class _Pending:
    key: str
    pixels: torch.Tensor
    future: asyncio.Future


class EncodeBatcher:
    def __init__(
        self,
        encoder: ImageEncoder,
        cache: EmbeddingCache,
        max_images_per_batch: int = 8,
        max_tokens_per_batch: int | None = None,
    ) -> None:
        if max_images_per_batch <= 0:
            raise ValueError(f"max_images_per_batch must be positive, got {max_images_per_batch}")
        self.encoder = encoder
        self.cache = cache
        self.max_images = max_images_per_batch
        self.max_tokens = max_tokens_per_batch or max_images_per_batch * encoder.num_image_tokens
        self._queue: deque[_Pending] = deque()
        self._inflight: dict[str, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="vision")
        self.batch_sizes: list[int] = []

    def submit(self, images: list[bytes]) -> tuple[list[asyncio.Future], int]:
        """One future per image (in order) and the number of cache hits. Must run on the loop.

        Every image is preprocessed before anything is queued, so a bad image queues nothing.
        """
        loop = asyncio.get_running_loop()
        keys = [image_key(b, self.encoder.model_id) for b in images]
        futures: list[asyncio.Future | None] = []
        new: list[tuple[str, torch.Tensor]] = []
        hits = 0
        for i, (key, data) in enumerate(zip(keys, images)):
            cached = self.cache.get(key)
            if cached is not None:
                hits += 1
                fut = loop.create_future()
                fut.set_result(cached)
                futures.append(fut)
            elif key in self._inflight:
                futures.append(self._inflight[key])
            else:
                new.append((key, self.encoder.preprocess(data, i)))
                futures.append(None)
        it = iter(new)
        for j, fut in enumerate(futures):
            if fut is None:
                key, pixels = next(it)
                if key in self._inflight:  # the same image twice in this request
                    futures[j] = self._inflight[key]
                    continue
                futures[j] = self._inflight[key] = loop.create_future()
                self._queue.append(_Pending(key, pixels, futures[j]))
        if self._queue and (self._task is None or self._task.done()):
            self._task = loop.create_task(self._drain())
        return futures, hits

    async def encode(self, images: list[bytes]) -> tuple[list[torch.Tensor], int, float]:
        """(features per image, cache hits, seconds spent waiting for vision forwards)."""
        futures, hits = self.submit(images)
        start = time.perf_counter()
        feats = list(await asyncio.gather(*futures))
        return feats, hits, (time.perf_counter() - start) if hits < len(images) else 0.0

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        per_image = self.encoder.num_image_tokens
        while (
            self._queue
            and len(batch) < self.max_images
            and (len(batch) + 1) * per_image <= max(self.max_tokens, per_image)
        ):
            batch.append(self._queue.popleft())
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = self._take_batch()
            self.batch_sizes.append(len(batch))
            pixels = torch.stack([p.pixels for p in batch])
            try:
                feats = await loop.run_in_executor(self._pool, self.encoder.forward, pixels)
            except Exception as e:  # the vision forward failed: fail exactly these images
                for p in batch:
                    self._inflight.pop(p.key, None)
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            for p, f in zip(batch, feats):
                self.cache.put(p.key, f)
                self._inflight.pop(p.key, None)
                if not p.future.done():
                    p.future.set_result(f)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
