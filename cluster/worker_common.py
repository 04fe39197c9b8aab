"""What every worker actor shares: thread setup, model loading, and its status record."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str
    node_id: str
    hostname: str
    pid: int


def setup_threads(num_threads: int) -> None:
    """One OpenMP pool per worker, sized to its CPU share: oversubscribed OpenMP threads spin
    against each other and slow a shared machine down by an order of magnitude."""
    import torch

    torch.set_num_threads(max(1, num_threads))


def worker_info(worker_id: str, role: str) -> WorkerInfo:
    node_id = "local"
    try:
        import ray

        if ray.is_initialized():  # outside an actor (tests) asking would start a Ray instance
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return WorkerInfo(worker_id, role, node_id, socket.gethostname(), os.getpid())
