"""Lazy registry of KV transports: a backend's module is imported on first use only, so an
optional dependency (cupy for NCCL) loads only when that backend is chosen."""

from __future__ import annotations

import importlib

from kv_transfer.base import TransferBackend

_BACKENDS: dict[str, str] = {
    "fake": "kv_transfer.fake:FakeBackend",
    "shm": "kv_transfer.shm:ShmBackend",
    "gloo": "kv_transfer.gloo:GlooBackend",
    "cuda_ipc": "kv_transfer.cuda_ipc:CudaIpcBackend",
    "nccl": "kv_transfer.nccl_cupy:NcclBackend",
}


def known_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def get_backend(name: str) -> type[TransferBackend]:
    """The backend class for `name`; ValueError for unknown names, ImportError if a dep is missing."""
    try:
        target = _BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown KV transfer backend {name!r}; known: {', '.join(known_backends())}"
        ) from None
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"KV transfer backend {name!r} cannot load: {e}") from e
    return getattr(module, class_name)
