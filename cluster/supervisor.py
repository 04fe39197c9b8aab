"""The supervisor: notices dead workers, starts replacements and swaps them into the router.

Every pool is supervised: encode, prefill and decode (or colocated) workers. One loop, every `check_s`:

    live worker ──health ping (ready(), bounded)── actor died ──▶ router.mark_dead(worker)
    dead worker, no restart under way, restarts < max_restarts ──▶ a restart task:

        wait backoff (0 on the first try; then backoff_s·2^(k-1), capped) ──▶ spawn(worker_id, epoch)
          ──▶ ready() within ready_timeout_s ──▶ its KV layout (if any) compatible ──▶ router.replace_worker
          └── any failure (no node offers the pool's resources, load error, layout mismatch):
              kill the half-started actor, k += 1, try again while restarts < max_restarts

A ping that times out is not a death (a busy worker is slow, not dead); only Ray's own verdict
(RayActorError / ActorDiedError / ActorUnavailableError) marks a worker dead. A worker that has
used up max_restarts stays dead; cluster status keeps showing it (alive false, its epoch).

The supervisor never touches requests: the router already failed or retried them when it
marked the worker dead. It only owns actors it is starting; once swapped in, the controller's
teardown owns them like the originals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.pools import WorkerHandle, is_actor_death
from cluster.router import ClusterRouter
from engine.worker_api import Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorOptions:
    check_s: float = 1.0  # how often dead workers are looked for and live ones pinged
    ping_timeout_s: float = 5.0
    ready_timeout_s: float = 120.0  # a replacement that is not ready by then is killed and retried
    backoff_s: float = 1.0  # wait before the 2nd consecutive try; doubles per failed try
    max_backoff_s: float = 30.0
    max_restarts: int = 10  # tries per worker id over the cluster's life (successful or not)


@dataclass(frozen=True)
class RestartRecord:
    worker_id: str
    epoch: int  # the replacement's epoch (the original worker has epoch 0)
    node_id: str
    at_unix_s: float
    seconds: float  # spawn to ready (or to failure)
    error: str | None = None  # None: the replacement serves


Spawn = Callable[[Role, str, int], object]  # (role, worker_id, epoch) -> a new, not yet ready actor
CheckLayout = Callable[[object], None]  # raises when a replacement's KV layout is incompatible


class Supervisor:
    def __init__(
        self,
        router: ClusterRouter,
        spawn: Spawn,
        kill: Callable[[object], None],
        *,
        check_layout: CheckLayout | None = None,
        options: SupervisorOptions = SupervisorOptions(),
        is_death: Callable[[BaseException], bool] = is_actor_death,
    ) -> None:
        self.router = router
        self.options = options
        self._spawn = spawn
        self._kill = kill
        self._check_layout = check_layout
        self._is_death = is_death
        self.history: list[RestartRecord] = []
        self.tries: dict[str, int] = {}  # worker id -> restart tries so far
        self._restarting: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ what status shows
    def restarts(self) -> dict[str, int]:
        """Successful restarts per worker id."""
        out: dict[str, int] = {}
        for r in self.history:
            if r.error is None:
                out[r.worker_id] = out.get(r.worker_id, 0) + 1
        return out

    def given_up(self) -> list[str]:
        return sorted(
            w.worker_id
            for w in self._workers()
            if not w.alive
            and w.worker_id not in self._restarting
            and self.tries.get(w.worker_id, 0) >= self.options.max_restarts
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._restarting.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._restarting.clear()

    async def wait_all_alive(self, timeout_s: float) -> bool:
        """True once every worker is alive (tests and benches wait on this after chaos)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if all(w.alive for w in self._workers()):
                return True
            await asyncio.sleep(0.1)
        return False

    def _workers(self) -> list[WorkerHandle]:
        return self.router.prefill + self.router.decode + self.router.encode

    async def _run(self) -> None:
        while True:
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervisor check failed")
            await asyncio.sleep(self.options.check_s)

    async def check_once(self) -> None:
        """One round: ping live workers, then start a restart for each dead one that has none."""
        live = [w for w in self._workers() if w.alive]
        await asyncio.gather(*(self._ping(w) for w in live))
        loop = asyncio.get_running_loop()
        for w in self._workers():
            if w.alive or w.worker_id in self._restarting:
                continue
            if self.tries.get(w.worker_id, 0) >= self.options.max_restarts:
                continue
            self._restarting[w.worker_id] = loop.create_task(self._restart(w))

    async def _ping(self, w: WorkerHandle) -> None:
        try:
            await asyncio.wait_for(w.actor.ready.remote(), self.options.ping_timeout_s)
        except asyncio.TimeoutError:
            pass
        except Exception as exc:
            if self._is_death(exc):
                self.router.mark_dead(w, exc)

    # ------------------------------------------------------------------ one restart
    async def _restart(self, dead: WorkerHandle) -> None:
        o = self.options
        failures = 0
        self._kill(dead.actor)  # a worker whose loop died still runs and holds its resources
        try:
            while self.tries.get(dead.worker_id, 0) < o.max_restarts:
                if failures:
                    await asyncio.sleep(min(o.max_backoff_s, o.backoff_s * 2 ** (failures - 1)))
                self.tries[dead.worker_id] = self.tries.get(dead.worker_id, 0) + 1
                if await self._try_once(dead):
                    return
                failures += 1
            log.error("giving up on %s after %d restart tries", dead.worker_id, self.tries[dead.worker_id])
        finally:
            self._restarting.pop(dead.worker_id, None)

    async def _try_once(self, dead: WorkerHandle) -> bool:
        epoch = dead.epoch + 1
        t0, at = time.monotonic(), time.time()
        actor = None
        try:
            actor = self._spawn(dead.role, dead.worker_id, epoch)
            ready = await asyncio.wait_for(actor.ready.remote(), self.options.ready_timeout_s)
            if self._check_layout is not None and ready.layout is not None:  # None: no KV cache (encode)
                self._check_layout(ready.layout)
        except asyncio.CancelledError:
            if actor is not None:
                self._kill(actor)
            raise
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                exc = TimeoutError(
                    f"not ready within {self.options.ready_timeout_s:.0f}s (no node with the pool's resources?)"
                )
            if actor is not None:
                self._kill(actor)
            log.warning("restart of %s (epoch %d) failed: %s", dead.worker_id, epoch, exc)
            self.history.append(RestartRecord(dead.worker_id, epoch, "", at, time.monotonic() - t0, repr(exc)))
            return False
        node_id = ready.info.node_id
        self.router.replace_worker(dead, actor, node_id)
        record = RestartRecord(dead.worker_id, epoch, node_id, at, time.monotonic() - t0)
        self.history.append(record)
        log.warning(
            "worker %s restarted (epoch %d) on node %s in %.1fs", dead.worker_id, epoch, node_id[:12], record.seconds
        )
        return True
