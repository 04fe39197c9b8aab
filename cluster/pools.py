"""The router's view of its workers: a handle per worker, the pools they sit in, and leases.

A WorkerHandle stands for one worker *at one epoch*. A restart (cluster/supervisor.py) or a role
switch (cluster/role_switch.py) puts a new handle with epoch + 1 in its place; the old one is
retired or stays dead, so a request still holding it fails against the old actor instead of
reaching a worker that never saw it.

Leases are the only thing that changes a worker's in-flight count:

    with Lease(worker):              # a call bounded by this block (prefill, encode, reserve)
        ...
    lease = Lease(worker)            # or held across calls (a request's decode worker) ...
    lease.release()                  # ... and given back once; a second release does nothing

Invariant: `worker.inflight` == the number of that handle's leases not yet released. The
router picks the least-loaded worker by it, counts a reservation before awaiting it (so
concurrent admissions spread out), and a role switch drains a worker until it is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import WorkerLoopDied
from engine.worker_api import Role


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    role: Role
    actor: object
    node_id: str = ""
    alive: bool = True
    epoch: int = 0  # restarts and role switches of this worker id (each + 1)
    draining: bool = False  # a role switch is waiting for its requests to end: no new work
    retired: bool = False  # replaced by a handle of a newer epoch (role switch)
    _leases: int = 0

    @property
    def inflight(self) -> int:
        """Requests (or calls) of this router on the worker: its unreleased leases."""
        return self._leases

    @property
    def serving(self) -> bool:
        return self.alive and not self.draining and not self.retired


class Lease:
    """One unit of a worker's in-flight count, taken at construction, given back by release()
    (idempotent) or at the end of a `with` block."""

    __slots__ = ("worker", "_held")

    def __init__(self, worker: WorkerHandle) -> None:
        worker._leases += 1
        self.worker = worker
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.worker._leases -= 1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Pools:
    """The encode, prefill and decode pools (colocated workers sit in `decode`). The lists are
    shared with the supervisor and the role switcher, which replace handles in place."""

    def __init__(self, encode: list[WorkerHandle], prefill: list[WorkerHandle], decode: list[WorkerHandle]) -> None:
        self.encode = encode
        self.prefill = prefill
        self.decode = decode

    def of(self, role: Role) -> list[WorkerHandle]:
        """The list a worker of `role` lives in."""
        return {Role.ENCODE: self.encode, Role.PREFILL: self.prefill}.get(role, self.decode)

    def all(self) -> list[WorkerHandle]:
        return self.encode + self.prefill + self.decode

    def find(self, worker_id: str) -> WorkerHandle | None:
        """The current (not retired) handle of a worker id."""
        return next((w for w in self.all() if w.worker_id == worker_id and not w.retired), None)

    @staticmethod
    def least_loaded(pool: list[WorkerHandle]) -> WorkerHandle | None:
        return min((w for w in pool if w.serving), key=lambda w: w.inflight, default=None)

    @staticmethod
    def by_load(pool: list[WorkerHandle]) -> list[WorkerHandle]:
        return sorted((w for w in pool if w.serving), key=lambda w: w.inflight)


def is_stale(exc: BaseException) -> bool:
    """The worker refused a call meant for an older epoch / another role (cluster/worker_actor.py)."""
    from cluster.worker_actor import StaleEpochError

    cause = getattr(exc, "cause", None)
    return isinstance(exc, StaleEpochError) or isinstance(cause, StaleEpochError)


def is_actor_death(exc: BaseException) -> bool:
    """Ray says the worker's process is gone, or the worker says its step loop died (it is then
    as good as dead: the supervisor kills and replaces it)."""
    import ray.exceptions as rex

    # OutOfMemoryError: Ray's memory monitor killed the worker's process mid-call.
    if isinstance(exc, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError, rex.OutOfMemoryError)):
        return True
    return isinstance(exc, WorkerLoopDied) or isinstance(getattr(exc, "cause", None), WorkerLoopDied)
