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
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        node_id = "local"
    return WorkerInfo(worker_id, role, node_id, socket.gethostname(), os.getpid())
