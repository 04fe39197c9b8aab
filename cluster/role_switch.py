"""Role switching: moving a live worker to another pool without reloading its weights.

    checks (disaggregated, alive, a move it can make, another worker stays in its pool)
    ─▶ drain: the handle stops taking new work (`draining`); wait until no request of this
       router is on it (no lease, no flight) and the worker says it holds nothing (bounded;
       on timeout it serves again)
    ─▶ set_role(role, epoch + 1) on the worker (cluster/worker_actor.py)
    ─▶ a new handle (that epoch) in the other pool; the old handle is retired, so its poller
       stops and calls made for its epoch are refused (StaleEpochError)

Moves go between prefill and decode, or between encode and prefill (a vision-language
deployment whose workers hold both halves of the model, `role_switching.encode_prefill`). One
switch runs at a time. The manual path is the admin RPC; the automatic one is the role policy
(cluster/role_policy.py). The most recent switches are kept for GetClusterStatus.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

from cluster.flight import Flight
from cluster.pools import Pools, WorkerHandle, is_actor_death
from cluster.router_api import ErrorKind, RoleSwitch, RouterError
from engine.worker_api import Mode, Role

log = logging.getLogger(__name__)
SWITCH_HISTORY = 256
SWITCH_TIMEOUT_S = 120.0


class RoleSwitcher:
    def __init__(
        self,
        *,
        mode: Mode,
        pools: Pools,
        flights: dict[str, Flight],
        worker_died: Callable[[WorkerHandle, BaseException], None],
        start_poller: Callable[[WorkerHandle], None],
    ) -> None:
        self.mode = mode
        self.pools = pools
        self.flights = flights
        self.worker_died = worker_died
        self.start_poller = start_poller
        self.switches: collections.deque[RoleSwitch] = collections.deque(maxlen=SWITCH_HISTORY)
        self.switch_count = 0
        self._lock = asyncio.Lock()

    async def worker_roles(self, worker: WorkerHandle) -> frozenset[Role]:
        """The roles a worker can take (what it loaded at start); its own role if it cannot say."""
        try:
            return frozenset(await asyncio.wait_for(worker.actor.roles.remote(), 10.0))
        except Exception as exc:
            if is_actor_death(exc):
                self.worker_died(worker, exc)
            return frozenset({worker.role})

    async def set_worker_role(
        self, worker_id: str, role: Role, reason: str = "manual", drain_timeout_s: float = 60.0
    ) -> RoleSwitch:
        """Raises RouterError: INVALID_ARGUMENT (unknown worker / role), FAILED_PRECONDITION (the
        switch would empty a pool, the worker cannot take that role, is dead or still busy,
        another switch runs)."""
        if self.mode is not Mode.DISAGGREGATED:
            raise RouterError(ErrorKind.FAILED_PRECONDITION, "role switching needs a disaggregated deployment")
        if role not in (Role.ENCODE, Role.PREFILL, Role.DECODE):
            raise RouterError(
                ErrorKind.INVALID_ARGUMENT, f"a worker can switch to encode, prefill or decode, not {role.value}"
            )
        if self._lock.locked():
            raise RouterError(ErrorKind.FAILED_PRECONDITION, "another role switch is in progress")
        async with self._lock:
            worker = await self._check(worker_id, role)
            src, dst = self.pools.of(worker.role), self.pools.of(role)
            t0 = time.monotonic()
            worker.draining = True
            try:
                drained = await self._drained(worker, drain_timeout_s)
                if not worker.alive:
                    raise RouterError(ErrorKind.UNAVAILABLE, f"worker {worker_id} died while draining")
                if not drained:
                    raise RouterError(
                        ErrorKind.FAILED_PRECONDITION,
                        f"worker {worker_id} still had requests after {drain_timeout_s:.0f}s of "
                        f"draining; switch cancelled, it serves as {worker.role.value} again",
                    )
                epoch = worker.epoch + 1
                try:
                    ready, switch_s = await asyncio.wait_for(
                        worker.actor.set_role.remote(role, epoch), SWITCH_TIMEOUT_S
                    )
                except asyncio.TimeoutError:
                    raise RouterError(
                        ErrorKind.INTERNAL, f"worker {worker_id} did not switch within {SWITCH_TIMEOUT_S:.0f}s"
                    ) from None
                except Exception as exc:
                    if is_actor_death(exc):
                        self.worker_died(worker, exc)
                        raise RouterError(ErrorKind.UNAVAILABLE, f"worker {worker_id} died while switching") from None
                    raise RouterError(ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} refused: {exc}") from None
            finally:
                worker.draining = False
            new = WorkerHandle(worker.worker_id, role, worker.actor, ready.info.node_id, epoch=epoch)
            worker.retired = True
            src.remove(worker)
            dst.append(new)
            if role is Role.DECODE:
                self.start_poller(new)
            record = RoleSwitch(
                worker_id,
                worker.role,
                role,
                time.time(),
                reason,
                epoch=epoch,
                drain_s=time.monotonic() - t0 - switch_s,
                switch_s=switch_s,
            )
            self.switches.append(record)
            self.switch_count += 1
            log.warning(
                "worker %s switched %s -> %s (epoch %d, drain %.1fs, switch %.2fs): %s",
                worker_id,
                worker.role.value,
                role.value,
                epoch,
                record.drain_s,
                switch_s,
                reason,
            )
            return record

    async def _check(self, worker_id: str, role: Role) -> WorkerHandle:
        worker = self.pools.find(worker_id)
        if worker is None:
            known = ", ".join(w.worker_id for w in self.pools.all() if not w.retired)
            raise RouterError(ErrorKind.INVALID_ARGUMENT, f"no worker {worker_id!r} (workers: {known})")
        if worker.role is role:
            raise RouterError(ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} already is a {role.value} worker")
        if not worker.alive:
            raise RouterError(ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} is dead")
        if Role.DECODE in (worker.role, role) and Role.ENCODE in (worker.role, role):
            raise RouterError(
                ErrorKind.FAILED_PRECONDITION,
                f"worker {worker_id}: switches go between prefill and decode or between encode and "
                f"prefill; move it to prefill first",
            )
        if role not in await self.worker_roles(worker):
            held = "only the vision tower" if worker.role is Role.ENCODE else "no vision tower"
            raise RouterError(
                ErrorKind.FAILED_PRECONDITION,
                f"worker {worker_id} cannot take the {role.value} role: it holds {held} (with "
                f"role_switching.encode_prefill: true, encode and prefill workers load both "
                f"halves of a vision-language model)",
            )
        if not any(w.serving for w in self.pools.of(worker.role) if w is not worker):
            raise RouterError(
                ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} is the last live {worker.role.value} worker"
            )
        return worker

    async def _drained(self, worker: WorkerHandle, timeout_s: float) -> bool:
        """Wait until no request of this router is on the worker and the worker holds nothing."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if worker.inflight == 0 and not any(
                f.decode is worker or f.prefill is worker for f in self.flights.values()
            ):
                try:
                    if await asyncio.wait_for(worker.actor.idle.remote(), 10.0):
                        return True
                except Exception as exc:
                    if is_actor_death(exc):
                        self.worker_died(worker, exc)
                        return False
            await asyncio.sleep(0.05)
        return False
