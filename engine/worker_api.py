"""What every worker and the cluster above it share: the roles a worker serves in, the
deployment modes, a worker's identity, ready and status records, its thread setup (and a free
port for a rendezvous), and the one protocol every inner worker (encode, prefill, decode,
colocated) implements.

This module sits below the workers: `engine`, `kv_transfer`, `*_workers` and `cluster` all
import it, and it imports nothing of the project. `triptych/types.py` mirrors `Role`, `Mode` and
`WorkerStatus` for SDK users (from the proto); that is their only other copy.
"""

from __future__ import annotations

import enum
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: this module imports nothing of the project at run time
    from engine.kv_cache import CacheEvents
    from engine.kv_layout import KVLayout


TENANT_ACTIVE_S = 5.0
"""A tenant (an API key's principal) counts as active this long after its last request was
served: a client between two requests of a conversation still gets its fair share."""


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
class WorkerReady:
    """What `ready()` answers, the same for every role: who the worker is, and the layout of the
    KV cache it holds (None for an encode worker, which holds none)."""

    info: WorkerInfo
    layout: KVLayout | None = None


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
    kv_blocks_cached: int = 0  # prefix caching: cached blocks no request holds (reusable, evictable)
    # decode-side KV selection (engine/kv_select) since the worker started: decode rows that
    # attended to a selection, their kept share of their context's blocks, and selections scored
    kv_selected_rows: int = 0
    kv_selection_density: float = 1.0
    kv_selection_rescores: int = 0


class Worker(Protocol):
    """What every inner worker (EncodeWorker, PrefillWorker, DecodeWorker, ColocatedWorker)
    answers; the worker actor (cluster/worker_actor.py) hosts one at a time and adds the role's
    own verbs (encode / stats, prefill / prepare_images / release_images, reserve / activate /
    submit (a short prompt on cached earlier turns) / poll, submit / poll).

    Every method may raise WorkerLoopDied once the worker's loop has died (then it is replaced).
    `stop()` releases everything the worker holds: its loop, its executor thread, its transfer
    endpoints and its KV cache; nothing is called on a worker after it."""

    async def ready(self) -> WorkerReady: ...

    async def status(self) -> WorkerStatus: ...

    async def cache_events(self) -> CacheEvents:
        """What its prefix cache stored and evicted since the last call (empty without one): the
        router's cache-aware index follows it (cluster/prefix_index.py)."""
        ...

    async def idle(self) -> bool:
        """True when it holds nothing: no queued or running request, no KV block, no transfer."""
        ...

    async def cancel(self, request_id: str) -> bool:
        """Drop what it holds for the request; False when it held nothing."""
        ...

    async def stop(self) -> None: ...


def setup_threads(num_threads: int) -> None:
    """One OpenMP pool per worker, sized to its CPU share: oversubscribed OpenMP threads spin
    against each other and slow a shared machine down by an order of magnitude."""
    import torch

    torch.set_num_threads(max(1, num_threads))


def node_id() -> str:
    """This process's node: Ray's node id when running in a Ray actor, else "local"."""
    try:
        import ray

        if ray.is_initialized():  # outside an actor (tests) asking would start a Ray instance
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return "local"


def worker_info(worker_id: str, role: Role) -> WorkerInfo:
    """This process's WorkerInfo (its node as `node_id` says)."""
    return WorkerInfo(worker_id, Role(role), node_id(), socket.gethostname(), os.getpid())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (a tensor-parallel group's rendezvous, a local server)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
