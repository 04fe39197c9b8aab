"""What every worker and the cluster above it share: the roles a worker serves in, the
deployment modes, a worker's identity and status records, its thread setup, and the one
protocol every inner worker (encode, prefill, decode / colocated) implements.

This module sits below the workers: `engine`, `kv_transfer`, `*_workers` and `cluster` all
import it, and it imports nothing of the project. `triptych/types.py` mirrors `Role`, `Mode` and
`WorkerStatus` for SDK users (from the proto); that is their only other copy.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass


class Role(str, enum.Enum):
    """The pool a worker serves in. A string enum: deploy YAML and the proto name roles by value."""

    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class Mode(str, enum.Enum):
    """How a deployment serves: one pool running whole requests, or prefill and decode split."""

    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


@dataclass(frozen=True)
class WorkerInfo:
    """Who a worker is and where it runs (what `ready()` reports with its KV layout)."""

    worker_id: str
    role: Role
    node_id: str
    hostname: str
    pid: int


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the router and `GetClusterStatus` see it."""

    worker_id: str
    role: Role
    node_id: str
    alive: bool
    queue_length: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    epoch: int = 0


def setup_threads(num_threads: int) -> None:
    """One OpenMP pool per worker, sized to its CPU share: oversubscribed OpenMP threads spin
    against each other and slow a shared machine down by an order of magnitude."""
    import torch

    torch.set_num_threads(max(1, num_threads))


def worker_info(worker_id: str, role: Role) -> WorkerInfo:
    """This process's WorkerInfo; the node id is Ray's when running in a Ray actor, else "local"."""
    node_id = "local"
    try:
        import ray

        if ray.is_initialized():  # outside an actor (tests) asking would start a Ray instance
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return WorkerInfo(worker_id, Role(role), node_id, socket.gethostname(), os.getpid())
