"""Multimodal embedding cache: image content hash → image features, LRU, bounded by bytes.

Key: sha256 over the model id and the image bytes, so two models never share an entry and the
same picture sent twice (or by two requests) is encoded once.

Invariant, checked after every change: the bytes of all cached tensors <= max_bytes. A tensor
larger than the whole bound is never cached. Cached tensors are shared with callers and must
not be modified (they are sent as read-only payloads).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch


def image_key(image: bytes, model_id: str) -> str:
    h = hashlib.sha256()
    h.update(model_id.encode())
    h.update(b"\0")
    h.update(image)
    return h.hexdigest()


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    nbytes: int
    max_bytes: int


class EmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # oldest use first
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        """The cached features (marked most recently used), or None; counts a hit or a miss."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> bool:
        """Cache `value`, evicting least recently used entries; False if it alone exceeds the bound."""
        size = value.nbytes
        if size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.nbytes
        while self.nbytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = value
        self.nbytes += size
        assert self.nbytes <= self.max_bytes, (self.nbytes, self.max_bytes)
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, len(self._entries), self.nbytes, self.max_bytes)
