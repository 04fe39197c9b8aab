"""Encoding inside a prefill or colocated worker, for deployments without an encode pool.

    deployment has encode workers ──▶ EPD: images go to the encode pool, features arrive over
                                      kv_transfer (transfer.py / parallel.py); this module is unused
    encode pool has 0 workers     ──▶ the router sends the raw image bytes with the prefill task
    (or colocated mode)               (or the colocated submit); the worker holds an
                                      InProcessEncoder and encodes them itself, synchronously,
                                      on its compute thread, before the prompt's forward

The worker loads the vision tower + projector only in that case (`from_model_dir`); the same
content-hash LRU cache as an encode worker's sits in front of the vision forward, and the
images of one call (a prefill batch may carry several requests' images) share forwards of at
most `max_images_per_batch` images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from encode_workers.cache import CacheStats, EmbeddingCache, image_key
from encode_workers.encoder import ImageEncoder


@dataclass(frozen=True)
class InProcessEncodeStats:
    images: int
    cache_hits: int
    forwards: int
    seconds: float  # preprocessing + vision forwards of this call


class InProcessEncoder:
    def __init__(self, encoder: ImageEncoder, *, cache_bytes: int = 512 << 20, max_images_per_batch: int = 8) -> None:
        if max_images_per_batch <= 0:
            raise ValueError(f"max_images_per_batch must be positive, got {max_images_per_batch}")
        self.encoder = encoder
        self.cache = EmbeddingCache(cache_bytes)
        self.max_images = max_images_per_batch

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> "InProcessEncoder":
        """Load only the vision tower + projector of a local LLaVA checkpoint."""
        return cls(ImageEncoder.from_model_dir(model_dir, dtype), **kwargs)

    @property
    def calls(self) -> int:
        """Vision forwards run so far (tests assert cache hits skip them)."""
        return self.encoder.calls

    def encode(self, images: list[bytes]) -> tuple[list[torch.Tensor], InProcessEncodeStats]:
        """Features [num_image_tokens, H] per image, in order.

        InvalidRequestError names the first image (by its index in `images`) that is not an
        image; nothing is encoded then."""
        start = time.perf_counter()
        calls = self.encoder.calls
        keys = [image_key(b, self.encoder.model_id) for b in images]
        out: list[torch.Tensor | None] = [None] * len(images)
        todo: dict[str, list[int]] = {}  # key → indices of that image in this call
        pixels: list[torch.Tensor] = []
        hits = 0
        for i, (key, data) in enumerate(zip(keys, images)):
            if key in todo:
                todo[key].append(i)
                continue
            cached = self.cache.get(key)
            if cached is not None:
                out[i] = cached
                hits += 1
                continue
            todo[key] = [i]
            pixels.append(self.encoder.preprocess(data, i))
        pending = list(todo.items())
        for lo in range(0, len(pending), self.max_images):
            chunk = pending[lo : lo + self.max_images]
            feats = self.encoder.forward(torch.stack(pixels[lo : lo + self.max_images]))
            for (key, indices), f in zip(chunk, feats):
                self.cache.put(key, f)
                for i in indices:
                    out[i] = f
        stats = InProcessEncodeStats(len(images), hits, self.encoder.calls - calls, time.perf_counter() - start)
        return out, stats  # type: ignore[return-value]

    def stats(self) -> dict[str, object]:
        return {
            "encoder_calls": self.encoder.calls,
            "images_encoded": self.encoder.images_encoded,
            "cache": self.cache_stats(),
        }

    def cache_stats(self) -> CacheStats:
        return self.cache.stats()
