"""Lazy registry of KV transports: the one list of transport names and what each needs.

A backend's module is imported on first `get_backend` only, so an optional dependency (cupy for
NCCL) loads only when that backend is chosen; `known_backends` and `transport_info` import
nothing (no torch either), so the deploy schema takes its `transport.backend` names and checks
from here at load.

Each entry says where its transport works: `same_node_only` (sender and receiver must share a
machine: shared memory, CUDA IPC handles, or one process for the fake), `needs_cuda` (it moves
CUDA tensors, so every worker using it needs a GPU) and `tensor_parallel` (it connects prefill and
decode workers of tensor_parallel > 1). The deploy loader refuses a deployment that breaks any
(cluster/config.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kv_transfer.base import TransferBackend


@dataclass(frozen=True)
class TransportInfo:
    """A transport as the registry knows it, before its module is imported."""

    name: str
    target: str  # "module:Class" of its TransferBackend
    same_node_only: bool = False
    needs_cuda: bool = False
    # Moves KV between tensor-parallel groups: several senders per transfer (one per prefill rank,
    # each with its heads) into a cache spread over the receiving ranks (kv_transfer/shm.py writes
    # each rank's cache in place; kv_transfer/channel.py sends each rank its heads). Only the fake,
    # which lives in one process, does not.
    tensor_parallel: bool = False


_BACKENDS: dict[str, TransportInfo] = {
    t.name: t
    for t in (
        TransportInfo("fake", "kv_transfer.fake:FakeBackend", same_node_only=True),  # in-process, for tests
        TransportInfo(
            "shm", "kv_transfer.shm:ShmBackend", same_node_only=True, tensor_parallel=True
        ),  # POSIX shared memory
        TransportInfo("gloo", "kv_transfer.gloo:GlooBackend", tensor_parallel=True),  # TCP between CPUs, across nodes
        TransportInfo(
            "cuda_ipc",
            "kv_transfer.cuda_ipc:CudaIpcBackend",
            same_node_only=True,
            needs_cuda=True,
            tensor_parallel=True,
        ),  # GPUs of one node
        TransportInfo(
            "nccl", "kv_transfer.nccl_cupy:NcclBackend", needs_cuda=True, tensor_parallel=True
        ),  # across GPUs and nodes
    )
}


def known_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def transport_info(name: str) -> TransportInfo:
    """The registry entry for `name`; ValueError for unknown names. Imports nothing."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown KV transfer backend {name!r}; known: {', '.join(known_backends())}") from None


def get_backend(name: str) -> type[TransferBackend]:
    """The backend class for `name`; ValueError for unknown names, ImportError if a dep is missing."""
    module_name, _, class_name = transport_info(name).target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"KV transfer backend {name!r} cannot load: {e}") from e
    return getattr(module, class_name)
