"""WorkerActor: the one Ray actor every worker runs as, in every pool (encode, prefill, decode,
colocated). It only fences and delegates.

It loads what its roles need once, and serves through one inner worker at a time (each
implements engine/worker_api.py's `Worker`: ready / status / idle / cancel / stop, plus its
role's verbs):

    role        inner worker                                holds
    encode      EncodeWorker   (encode_workers/worker.py)     the vision tower + projector
    prefill     PrefillWorker  (prefill_workers/worker.py)    the language model, a KV sender
    decode      DecodeWorker   (decode_workers/worker.py)     the language model, a KV receiver
    colocated   ColocatedWorker (decode_workers/colocated_worker.py)  the language model, a plain KV cache

A role switch replaces that inner worker, not the process:

    set_role(role, epoch) ── refused unless epoch > current epoch (a stale or repeated order)
                          ── refused unless the inner worker is idle (the router drains it first:
                             no queued prompt, no reservation, no running sequence, no KV block
                             held, no transfer in flight)
                          ── inner worker stopped: its loop, thread, transfer endpoints and KV
                             cache released
                          ── new inner worker for `role` on the same weights; epoch = epoch

Which roles a worker can take is fixed when it starts (`options`): a plain encode worker only
encode (it loads only the vision tower); a colocated worker only colocated; prefill and decode
workers both (same language-model weights); encode and prefill both when a worker holds both
halves of the model (the encode and prefill pools of a LLaVA deployment with
`role_switching.encode_prefill: true`, so neither has to load anything to take the other's
role). Without an encode pool, a prefill (or colocated) role encodes its requests' images
itself; a worker that switches into it loads the vision side once and keeps it for its later
roles, so switching away and back loads nothing.

Epoch fencing: every call that starts work (reserve, activate, prefill, submit,
prepare_images, encode) carries the epoch the router's handle was made for. A call with another epoch,
or meant for another role, raises StaleEpochError and touches nothing: a reservation or prefill
ordered before a switch can never land in the new role's KV cache. The epoch also counts
restarts (a replacement actor starts at the dead one's epoch + 1), so it never repeats for a
worker id.
"""

from __future__ import annotations

import time

import torch

from decode_workers.colocated_core import ColocatedOptions
from decode_workers.colocated_worker import ColocatedWorker
from decode_workers.decode_core import DecodeOptions
from decode_workers.worker import DecodeWorker
from encode_workers.encoder import ImageEncoder
from encode_workers.inproc import InProcessEncoder
from encode_workers.worker import EncodeOptions, EncodeWorker
from cluster.tp_group import RankGroup, TPSpec
from engine.kv_cache import CacheEvents
from engine.llm_engine import LoadedModel
from engine.tensor_parallel import TP_ROLES
from engine.worker_api import Role, WorkerReady, WorkerStatus, setup_threads
from prefill_workers.prefill_core import PrefillOptions
from prefill_workers.worker import PrefillWorker

RoleOptions = EncodeOptions | PrefillOptions | DecodeOptions | ColocatedOptions
InnerWorker = EncodeWorker | PrefillWorker | DecodeWorker | ColocatedWorker


class StaleEpochError(RuntimeError):
    """A call meant for another epoch or role of this worker; nothing was done."""


class RoleSwitchError(RuntimeError):
    """A role switch this worker refused (busy, stale epoch, role it cannot take)."""


class WorkerActor:
    def __init__(
        self,
        worker_id: str,
        model: str | None,
        options: dict[Role, RoleOptions],
        num_threads: int,
        role: Role,
        epoch: int = 0,
        loaded: LoadedModel | None = None,
        vision: ImageEncoder | None = None,
        tp: TPSpec | None = None,
    ) -> None:
        """options: per role this worker may take, its options. Only ENCODE: a plain encode
        worker (no language model). ENCODE with other roles needs PREFILL: the language model is
        what the encode role switches to.
        loaded / vision: weights already in memory (tests); else `model` (when a role needs the
        language model) and the vision tower (with ENCODE among the options) are loaded.
        tp: this actor is rank 0 of a tensor-parallel group (cluster/tp_group.py) of a worker of
        one role; it starts the other ranks and its engine drives them."""
        if role not in options:
            raise ValueError(f"worker {worker_id}: no options for role {role.value}")
        if Role.ENCODE in options and len(options) > 1 and Role.PREFILL not in options:
            raise ValueError(
                f"worker {worker_id}: the encode role switches only to prefill; it needs the prefill role's options too"
            )
        setup_threads(num_threads)
        self.worker_id = worker_id
        self.options = options
        self.loaded = loaded
        language = [o for r, o in options.items() if r is not Role.ENCODE]
        if self.loaded is None and language:
            engine = language[0].engine
            self.loaded = LoadedModel.load(model, engine.dtype, engine.placement().device)
        self.group: RankGroup | None = None
        if tp is not None and tp.size > 1:
            if role not in TP_ROLES or len(options) > 1:
                raise ValueError(
                    f"worker {worker_id}: tensor parallelism is built for workers of one role among "
                    f"{', '.join(sorted(r.value for r in TP_ROLES))} (its ranks follow that role's forwards)"
                )
            self.group = RankGroup(worker_id, tp, model, role, options[role], self.loaded.device)
        self.vision = vision
        self._inproc: InProcessEncoder | None = None
        if Role.ENCODE in options and vision is None:
            enc = options[Role.ENCODE]
            self.vision = ImageEncoder.from_model_dir(enc.model_dir, getattr(torch, enc.dtype))
        self.role = role
        self.epoch = epoch
        self.impl: InnerWorker = self._build(role)
        self._switching = False

    def _build(self, role: Role) -> InnerWorker:
        opts = self.options[role]
        if role is Role.ENCODE:
            return EncodeWorker(self.worker_id, opts, self.vision)
        tp = self.group.tp if self.group else None
        if role is Role.PREFILL:
            encoder = self._in_process_encoder(opts.image_encoder_dir)
            return PrefillWorker(self.worker_id, opts, self.loaded, encoder, tp=tp)
        if role is Role.DECODE:
            return DecodeWorker(self.worker_id, opts, self.loaded, tp=tp)
        return ColocatedWorker(
            self.worker_id, opts, self.loaded, self._in_process_encoder(opts.image_encoder_dir), tp=tp
        )

    def _in_process_encoder(self, model_dir: str | None) -> InProcessEncoder | None:
        """The vision side a role that encodes its own images uses (no encode pool): loaded the
        first time a role needs it, then kept, so switching away and back loads nothing."""
        if model_dir is None or self.loaded.image_spec is None:
            return None
        if self._inproc is None:
            if self.vision is not None:
                self._inproc = InProcessEncoder(self.vision)
            else:
                self._inproc = InProcessEncoder.from_model_dir(model_dir, self.loaded.model.dtype)
                self.vision = self._inproc.encoder
        return self._inproc

    def _fence(self, epoch: int | None, *roles: Role) -> None:
        if self._switching:
            raise StaleEpochError(f"worker {self.worker_id} is switching role")
        if epoch is not None and epoch != self.epoch:
            raise StaleEpochError(f"worker {self.worker_id} is at epoch {self.epoch}, the call was for epoch {epoch}")
        if self.role not in roles:
            raise StaleEpochError(
                f"worker {self.worker_id} is a {self.role.value} worker, the call needs "
                f"{'/'.join(r.value for r in roles)}"
            )

    # ------------------------------------------------------------ role
    async def set_role(self, role: Role, epoch: int) -> tuple[WorkerReady, float]:
        """Switch to `role` as `epoch`; returns the new role's ready() answer and the seconds the
        switch took."""
        if role not in self.options:
            raise RoleSwitchError(
                f"worker {self.worker_id} cannot take role {role.value} "
                f"(it can be {', '.join(r.value for r in self.options)})"
            )
        if epoch <= self.epoch:
            raise RoleSwitchError(f"worker {self.worker_id} is at epoch {self.epoch}; refusing epoch {epoch}")
        if self._switching:
            raise RoleSwitchError(f"worker {self.worker_id} is already switching role")
        if not await self.impl.idle():
            raise RoleSwitchError(f"worker {self.worker_id} is not idle; drain it before switching its role")
        t0 = time.monotonic()
        self._switching = True
        try:
            await self.impl.stop()
            self.impl = self._build(role)
            self.role = role
            self.epoch = epoch
        finally:
            self._switching = False
        return await self.impl.ready(), time.monotonic() - t0

    async def roles(self) -> tuple[Role, ...]:
        """The roles this worker can take (the router checks before it drains a worker)."""
        return tuple(self.options)

    # ------------------------------------------------------------ every role (engine/worker_api.py Worker)
    async def ready(self) -> WorkerReady:
        self._check_group()
        return await self.impl.ready()  # raises WorkerLoopDied once the inner worker's loop died

    async def status(self) -> WorkerStatus:
        self._check_group()
        return await self.impl.status()

    async def cache_events(self) -> CacheEvents:
        self._check_group()
        return await self.impl.cache_events()

    def _check_group(self) -> None:
        """WorkerLoopDied once a rank of this worker's tensor-parallel group ended."""
        if self.group is not None:
            self.group.check()

    async def idle(self) -> bool:
        return await self.impl.idle()

    async def cancel(self, request_id: str) -> bool:
        return await self.impl.cancel(request_id)

    async def stop(self) -> None:
        """Release everything before the actor is killed (the controller's teardown)."""
        await self.impl.stop()
        if self.group is not None:
            self.group.stop()

    # ------------------------------------------------------------ encode role
    async def encode(self, transfer_id: str, images, descriptor, epoch: int | None = None):
        self._fence(epoch, Role.ENCODE)
        return await self.impl.encode(transfer_id, images, descriptor)

    async def stats(self) -> dict[str, object]:
        self._fence(None, Role.ENCODE)
        return await self.impl.stats()

    # ------------------------------------------------------------ prefill role
    async def prefill(self, task, epoch: int | None = None):
        self._fence(epoch, Role.PREFILL)
        return await self.impl.prefill(task)

    async def prepare_images(self, shards, epoch: int | None = None):
        self._fence(epoch, Role.PREFILL)
        return await self.impl.prepare_images(shards)

    async def release_images(self, shards) -> None:
        if self.role is Role.PREFILL:
            await self.impl.release_images(shards)

    # ------------------------------------------------------------ decode role
    async def reserve(
        self,
        request_id: str,
        num_prompt_tokens: int,
        lease_s: float | None = None,
        epoch: int | None = None,
        prompt_token_ids: list[int] | None = None,
        cache_salt: str = "",
        image_hashes: tuple[bytes, ...] = (),
    ):
        self._fence(epoch, Role.DECODE)
        return await self.impl.reserve(
            request_id, num_prompt_tokens, lease_s, prompt_token_ids, cache_salt, image_hashes
        )

    async def activate(
        self,
        request_id: str,
        prompt_token_ids,
        first_token: int,
        sampling,
        epoch: int | None = None,
        resume: tuple[int, int] | None = None,
        cache_salt: str | None = "",
        image_hashes: tuple[bytes, ...] = (),
    ):
        self._fence(epoch, Role.DECODE)
        return await self.impl.activate(
            request_id, prompt_token_ids, first_token, sampling, resume, cache_salt, image_hashes
        )

    # ------------------------------------------------------------ colocated role (and decode: local prefill)
    async def submit(
        self,
        request_id: str,
        prompt_token_ids,
        sampling,
        epoch: int | None = None,
        images: tuple[bytes, ...] = (),
        resume: tuple[int, int] | None = None,
        tenant: str = "",
        cache_salt: str = "",
    ) -> None:
        self._fence(epoch, Role.COLOCATED, Role.DECODE)
        await self.impl.submit(request_id, prompt_token_ids, sampling, images, resume, tenant, cache_salt)

    # ------------------------------------------------------------ decode and colocated roles
    async def poll(self, timeout_s: float = 1.0, epoch: int | None = None):
        """Step messages of a decode / colocated worker; a poll for an older epoch (a router's
        poller of a handle that a switch retired) raises StaleEpochError."""
        self._fence(epoch, Role.DECODE, Role.COLOCATED)
        return await self.impl.poll(timeout_s)
