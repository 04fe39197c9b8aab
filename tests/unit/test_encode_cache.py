"""Embedding cache: content-hash keys, LRU eviction, byte bound, hit/miss counters."""

import pytest
import torch

from encode_workers.cache import EmbeddingCache, image_key


def t(n_floats: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((n_floats,), fill)  # float32: 4 bytes each


def test_key_depends_on_bytes_and_model():
    assert image_key(b"abc", "m1") == image_key(b"abc", "m1")
    assert image_key(b"abc", "m1") != image_key(b"abd", "m1")
    assert image_key(b"abc", "m1") != image_key(b"abc", "m2")
    assert len(image_key(b"", "m")) == 64


def test_hits_misses_and_lru_eviction():
    cache = EmbeddingCache(max_bytes=3 * 40)
    for k in "abc":
        assert cache.put(k, t(10))
    assert cache.get("a") is not None  # a becomes most recent: order b, c, a
    assert cache.put("d", t(10))  # evicts b
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "acd" if k in cache}
    assert cache.get("b") is None
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.entries, s.nbytes) == (1, 1, 1, 3, 120)


def test_bound_is_never_exceeded_and_oversize_is_refused():
    cache = EmbeddingCache(max_bytes=100)
    assert not cache.put("huge", t(26))  # 104 bytes > bound
    assert len(cache) == 0
    sizes = [5, 12, 3, 20, 7, 25, 1, 9]
    for i, n in enumerate(sizes):
        cache.put(str(i), t(n))
        assert cache.nbytes <= 100
        assert cache.nbytes == sum(cache.get(k).nbytes for k in map(str, range(len(sizes))) if k in cache)
    assert "7" in cache and "6" in cache  # the newest survive


def test_replacing_a_key_keeps_the_byte_count():
    cache = EmbeddingCache(max_bytes=100)
    cache.put("a", t(10))
    cache.put("a", t(20, 1.0))
    assert cache.nbytes == 80 and len(cache) == 1 and cache.get("a")[0] == 1.0


def test_negative_bound_is_refused():
    with pytest.raises(ValueError):
        EmbeddingCache(-1)
