"""The router: owns every request's lifecycle, in the gateway's process. It is composed of parts,
each in its own module with its own lifecycle:

    admission    (cluster/admission.py)   prepare: images checked, template, tokens, limits;
                                          admit: in-flight cap, duplicate ids, a live worker
    dispatch     (cluster/dispatch.py)    a Flight through the workers: fair decode slot → KV
                                          reservation → [encode] → prefill → activate → decode,
                                          or submit to a colocated worker
    resume       (cluster/resume.py)      a request whose decode worker died is prefilled again
    role switch  (cluster/role_switch.py) drain a worker and move it to another pool
    pools        (cluster/pools.py)       worker handles, pools, leases (the in-flight counts)

This module wires them and holds what spans them: the registry of flights (request id → Flight),
one poller per decode worker routing its step messages to their flights, worker deaths (a death
seen by any call, poll or health check ends or resumes that worker's requests; the kernel frees
its shared memory: kv_transfer/segment.py), abort, cluster status and shutdown.

Every wait is bounded by the request's deadline. A decode worker that dies ends its requests with
FinalEvent(ERROR) naming the worker (or resumes them); nothing waits forever. Closing a stream
early aborts the request on whichever worker holds it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import AsyncIterator

from cluster.admission import Admission
from cluster.dispatch import Dispatcher
from cluster.flight import Aborted, DecodeDied, Flight
from cluster.fair_share import FairShare
from cluster.pools import Pools, WorkerHandle, is_actor_death, is_stale
from cluster.prefix_index import IndexFollower, PrefixIndex
from cluster.resume import Resume
from cluster.role_switch import RoleSwitcher
from cluster.router_api import (
    ChatMessage,
    ClusterStatus,
    FinalEvent,
    GenerateInput,
    ModelInfo,
    Prepared,
    RoleSwitch,
    Router,
    Timings,
    TokenEvent,
)
from engine.sequence import StepOutput
from engine.worker_api import Mode, Role, WorkerStatus

log = logging.getLogger(__name__)
RECENT = 4096
POLL_S = 0.5
STATUS_TIMEOUT_S = 5.0


class ClusterRouter(Router):
    def __init__(
        self,
        *,
        mode: Mode | str,
        tokenizer,
        model_info: ModelInfo,
        kv_capacity_tokens: int,
        prefill: list[WorkerHandle],
        decode: list[WorkerHandle],
        max_inflight: int,
        default_timeout_s: float,
        on_shutdown=None,
        encode: list[WorkerHandle] = (),
        image_token_id: int | None = None,
        tokens_per_image: int = 0,
        reprefill_on_decode_failure: bool = False,
        max_image_pixels: int | None = None,
        seqs_per_worker: int = 0,
        prefix_caching_block_size: int = 0,
        max_local_prefill_tokens: int = 0,
    ) -> None:
        """encode / image_token_id / tokens_per_image: a vision-language model's encode pool, its
        image placeholder token and how many placeholders one image's features fill.
        reprefill_on_decode_failure: a request whose decode worker dies is prefilled again
        (prompt + tokens so far) on live workers and goes on, instead of ending with an error.
        seqs_per_worker: sequences one decode / colocated worker runs at once (engine.max_num_seqs):
        the decode slots shared fairly among tenants (cluster/fair_share.py); 0: not shared out.
        prefix_caching_block_size: the workers' block size when they cache prefixes (engine.
        prefix_caching): prompts are then routed cache-aware (cluster/prefix_index.py); 0: by load.
        max_local_prefill_tokens: with it, disaggregated, a prompt whose uncached part on the
        decode worker holding its earlier turns is at most this long is prefilled there."""
        self.mode = Mode(mode)
        self.tokenizer = tokenizer
        self._info = model_info
        # The lists are shared with the supervisor, which swaps replacement handles into them.
        self.pools = Pools(encode if isinstance(encode, list) else list(encode), prefill, decode)
        self.seqs_per_worker = seqs_per_worker
        self.slots = FairShare(self._decode_slots)
        self._flights: dict[str, Flight] = {}
        self._pollers: list[asyncio.Task] = []
        self._on_shutdown = on_shutdown
        self.supervisor = None  # the controller's Supervisor (cluster/supervisor.py), if any
        self.policy = None  # the role policy (cluster/role_policy.py) when role switching is on
        # (end time, ttft_s, tpot_s, completion tokens, completed) of recent requests (role policy).
        self.recent: collections.deque[tuple[float, float, float, int, bool]] = collections.deque(maxlen=RECENT)
        self.admission = Admission(
            mode=self.mode,
            tokenizer=tokenizer,
            model_info=model_info,
            kv_capacity_tokens=kv_capacity_tokens,
            pools=self.pools,
            flights=self._flights,
            max_inflight=max_inflight,
            image_token_id=image_token_id,
            tokens_per_image=tokens_per_image,
            max_image_pixels=max_image_pixels,
        )
        self.dispatch = Dispatcher(
            mode=self.mode,
            pools=self.pools,
            flights=self._flights,
            slots=self.slots,
            slots_on=lambda: self.seqs_per_worker > 0,
            default_timeout_s=default_timeout_s,
            worker_died=self._worker_died,
            on_end=self._ended,
        )
        self.dispatch.resume = self.resume = Resume(self.dispatch, reprefill_on_decode_failure)
        self.cache_follower: IndexFollower | None = None  # the index follows the workers' caches
        if prefix_caching_block_size:
            bs = prefix_caching_block_size
            index = self.dispatch.prefix_index = PrefixIndex(bs, kv_capacity_tokens // bs, image_token_id)
            self.dispatch.max_local_prefill_tokens = max_local_prefill_tokens
            self.cache_follower = IndexFollower(index, lambda: self.pools.prefill + self.pools.decode)
        self.switcher = RoleSwitcher(
            mode=self.mode,
            pools=self.pools,
            flights=self._flights,
            worker_died=self._worker_died,
            start_poller=self._start_poller,
        )

    # ------------------------------------------------------------------ pools
    @property
    def encode(self) -> list[WorkerHandle]:
        return self.pools.encode

    @property
    def prefill(self) -> list[WorkerHandle]:
        return self.pools.prefill

    @property
    def decode(self) -> list[WorkerHandle]:
        """Decode workers (colocated workers when colocated)."""
        return self.pools.decode

    @property
    def reprefill_on_decode_failure(self) -> bool:
        return self.resume.enabled

    @reprefill_on_decode_failure.setter
    def reprefill_on_decode_failure(self, on: bool) -> None:
        self.resume.enabled = on

    def find_worker(self, worker_id: str) -> WorkerHandle | None:
        return self.pools.find(worker_id)

    def _decode_slots(self) -> int:
        """Sequences the live decode (or colocated) workers can run at once; 0: unbounded."""
        return self.seqs_per_worker * sum(w.serving for w in self.pools.decode)

    def start(self) -> None:
        for w in self.pools.decode:
            self._start_poller(w)
        if self.cache_follower is not None:
            self.cache_follower.start()

    def _start_poller(self, worker: WorkerHandle) -> None:
        self._pollers = [t for t in self._pollers if not t.done()]
        self._pollers.append(asyncio.get_running_loop().create_task(self._poll(worker)))

    async def _poll(self, worker: WorkerHandle) -> None:
        """Route one decode worker's step messages to their requests; fail them if it dies."""
        while worker.alive and not worker.retired:
            try:
                messages: list[list[StepOutput]] = await worker.actor.poll.remote(POLL_S, epoch=worker.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_actor_death(exc):
                    self._worker_died(worker, exc)
                    return
                if is_stale(exc):  # switched away (or switching): this handle is done
                    if worker.retired:
                        return
                    await asyncio.sleep(POLL_S / 5)
                    continue
                log.exception("polling %s failed", worker.worker_id)
                await asyncio.sleep(POLL_S)
                continue
            for step in messages:
                for out in step:
                    flight = self._flights.get(out.request_id)
                    if flight is not None:
                        flight.events.put_nowait(out)

    # ------------------------------------------------------------------ worker deaths
    def mark_dead(self, worker: WorkerHandle, exc: BaseException) -> None:
        """A health check saw the worker's actor die: fail its requests as if a call had."""
        self._worker_died(worker, exc)

    def replace_worker(self, old: WorkerHandle, actor, node_id: str) -> WorkerHandle:
        """Swap a ready replacement actor in for a dead worker (same id, epoch + 1).

        A new handle, not the old one revived: requests still holding the old handle keep
        failing against the dead actor instead of reaching a replacement that never saw them."""
        assert not old.alive, f"{old.worker_id} is alive; only a dead worker is replaced"
        pool = self.pools.of(old.role)
        new = WorkerHandle(old.worker_id, old.role, actor, node_id, epoch=old.epoch + 1)
        pool[pool.index(old)] = new
        if new.role not in (Role.PREFILL, Role.ENCODE):
            self._start_poller(new)
        return new

    def _worker_died(self, worker: WorkerHandle, exc: BaseException) -> None:
        if not worker.alive:
            return
        worker.alive = False
        log.error("worker %s died: %s", worker.worker_id, exc)
        for flight in list(self._flights.values()):
            if flight.decode is worker:
                flight.events.put_nowait(
                    DecodeDied(f"{worker.role.value} worker {worker.worker_id} died while serving this request")
                )

    # ------------------------------------------------------------------ requests
    def prepare(self, request: GenerateInput) -> Prepared:
        return self.admission.prepare(request)

    def apply_chat_template(self, messages) -> list[int]:
        return self.admission.apply_chat_template(messages)

    def count_tokens(self, messages) -> int:
        return self.admission.count_tokens(messages)

    def estimate_tokens(self, message: ChatMessage) -> int:
        return self.admission.estimate_tokens(message)

    def generate(
        self, request: GenerateInput, prepared: Prepared | None = None
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        prepared = prepared if prepared is not None else self.prepare(request)
        flight = self.admission.admit(request, prepared)
        return self.dispatch.stream(request, flight, list(prepared.token_ids))

    def shares_choices(self) -> bool:
        return True  # through the prefix cache, or a cache of the choices' own (Dispatch._salt)

    def _ended(self, t: Timings, completion_tokens: int, completed: bool) -> None:
        """A request ended by itself: its TTFT (the whole wait when it got no token) and TPOT
        go to the role policy's SLO window."""
        ttft = t.ttft_s if completion_tokens else t.e2e_s
        self.recent.append((time.monotonic(), ttft, t.tpot_s, completion_tokens, completed))

    async def abort(self, request_id: str) -> bool:
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        flight.aborted.set()  # ends a wait for a slot, KV space or prefill
        flight.events.put_nowait(Aborted())  # ends the decode phase
        return True

    def model_info(self) -> ModelInfo:
        return self._info

    # ------------------------------------------------------------------ role switching
    @property
    def switches(self):
        return self.switcher.switches

    @property
    def switch_count(self) -> int:
        return self.switcher.switch_count

    async def worker_roles(self, worker: WorkerHandle) -> frozenset[Role]:
        return await self.switcher.worker_roles(worker)

    async def set_worker_role(
        self, worker_id: str, role: Role, reason: str = "manual", drain_timeout_s: float = 60.0
    ) -> RoleSwitch:
        return await self.switcher.set_worker_role(worker_id, role, reason, drain_timeout_s)

    # ------------------------------------------------------------------ status
    async def cluster_status(self) -> ClusterStatus:
        async def one(w: WorkerHandle) -> WorkerStatus:
            if w.alive:
                try:
                    status = await asyncio.wait_for(w.actor.status.remote(), STATUS_TIMEOUT_S)
                    return dataclasses.replace(status, epoch=w.epoch)
                except Exception:
                    pass
            return WorkerStatus(w.worker_id, w.role, w.node_id, False, 0, 0, 0, 0, epoch=w.epoch)

        workers = await asyncio.gather(*(one(w) for w in self.pools.all()))
        restarts = tuple(sorted(self.supervisor.restarts().items())) if self.supervisor is not None else ()
        return ClusterStatus(
            self.mode, tuple(workers), tuple(self.switches), switch_count=self.switch_count, restarts=restarts
        )

    async def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """True once every live worker holds no request and no KV block (used by leak checks)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            workers = [w for w in self.pools.prefill + self.pools.decode if w.alive]
            states = await asyncio.gather(*(w.actor.idle.remote() for w in workers), return_exceptions=True)
            if all(s is True for s in states) and not self._flights:
                return True
            await asyncio.sleep(0.1)
        return False

    async def shutdown(self) -> None:
        for task in self._pollers:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        if self.cache_follower is not None:
            await self.cache_follower.stop()
        if self._on_shutdown is not None:
            await self._on_shutdown()
