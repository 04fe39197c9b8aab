"""RoleWorker: the Ray actor every prefill, decode and colocated worker runs as (and every
encode worker of a vision-language deployment with `role_switching.encode_prefill`).

It loads the weights once and serves through one role at a time, a PrefillWorker, a
DecodeWorker or (when it holds the vision tower too) an EncodeWorker built on those weights. A
role switch replaces that inner worker, not the process:

    set_role(role, epoch) ── refused unless epoch > current epoch (a stale or repeated order)
                          ── refused unless the inner worker is idle (the router drains it first:
                             no queued prompt, no reservation, no running sequence, no KV block
                             held, no transfer in flight)
                          ── inner worker closed: its transfer endpoints and KV cache released
                          ── new inner worker for `role` on the same weights; epoch = epoch

Which roles a worker can take is fixed when it starts (`options`): prefill and decode always
(same language-model weights); encode only if it also loaded the vision tower + projector, which
a worker does when its options include ENCODE (the encode and prefill pools of a LLaVA deployment
with `role_switching.encode_prefill: true`: both hold both halves of the model, so neither has to
load anything to take the other's role). Without an encode pool, a prefill role encodes its
requests' images itself; a worker that switches into it loads the vision side once and keeps it
for its later roles, so switching away and back loads nothing.

Epoch fencing: every call that starts work (reserve, activate, prefill, submit,
prepare_images, encode) carries the epoch the router's handle was made for. A call with another epoch,
or meant for another role, raises StaleEpochError and touches nothing: a reservation or prefill
ordered before a switch can never land in the new role's KV cache. The epoch also counts
restarts (a replacement actor starts at the dead one's epoch + 1), so it never repeats for a
worker id.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import torch

from decode_workers.actor import DecodeWorker
from decode_workers.decode_core import DecodeOptions
from encode_workers.encoder import ImageEncoder
from encode_workers.inproc import InProcessEncoder
from encode_workers.worker import EncodeWorker
from engine.llm_engine import LoadedModel
from engine.worker_api import Role, setup_threads
from prefill_workers.actor import PrefillWorker
from prefill_workers.prefill_core import PrefillOptions


class StaleEpochError(RuntimeError):
    """A call meant for another epoch or role of this worker; nothing was done."""


class RoleSwitchError(RuntimeError):
    """A role switch this worker refused (busy, stale epoch, role it cannot take)."""


@dataclass(frozen=True)
class EncodeOptions:
    """The encode role of a RoleWorker: the LLaVA checkpoint its vision tower comes from and the
    encode service's settings (as a plain encode worker's)."""

    model_dir: str
    dtype: str = "float32"
    backend: str = "shm"
    cache_bytes: int = 512 << 20
    max_images_per_batch: int = 8


class RoleWorker:
    def __init__(self, worker_id: str, model: str | None,
                 options: dict[Role, PrefillOptions | DecodeOptions | EncodeOptions],
                 num_threads: int, role: Role, epoch: int = 0, loaded: LoadedModel | None = None,
                 vision: ImageEncoder | None = None) -> None:
        """options: per role this worker may take, its options (a colocated worker has only COLOCATED;
        ENCODE needs PREFILL too: the language model is what the encode role switches to).
        loaded / vision: weights already in memory (tests); else `model` (and, with ENCODE among
        the options, its vision tower) is loaded."""
        if role not in options:
            raise ValueError(f"worker {worker_id}: no options for role {role.value}")
        if Role.ENCODE in options and Role.PREFILL not in options:
            raise ValueError(f"worker {worker_id}: the encode role needs the prefill role's options too")
        setup_threads(num_threads)
        self.worker_id = worker_id
        self.options = options
        self.num_threads = num_threads
        dtype = next(o.engine.dtype for o in options.values() if not isinstance(o, EncodeOptions))
        self.loaded = loaded or LoadedModel.load(model, dtype)
        self.vision = vision
        self._inproc: InProcessEncoder | None = None
        if Role.ENCODE in options and vision is None:
            enc = options[Role.ENCODE]
            self.vision = ImageEncoder.from_model_dir(enc.model_dir, getattr(torch, enc.dtype))
        self.role = role
        self.epoch = epoch
        self.impl = self._build(role)
        self._switching = False

    def _build(self, role: Role) -> PrefillWorker | DecodeWorker | EncodeWorker:
        opts = self.options[role]
        if role is Role.ENCODE:
            return EncodeWorker(encoder_factory=lambda: self.vision, backend=opts.backend, cache_bytes=opts.cache_bytes,
                                max_images_per_batch=opts.max_images_per_batch, worker_id=self.worker_id)
        encoder = self._in_process_encoder(opts)
        if role is Role.PREFILL:
            return PrefillWorker(self.worker_id, None, opts, self.num_threads, loaded=self.loaded, image_encoder=encoder)
        return DecodeWorker(self.worker_id, None, opts, self.num_threads, role, loaded=self.loaded,
                            image_encoder=encoder)

    def _in_process_encoder(self, opts) -> InProcessEncoder | None:
        """The vision side a role that encodes its own images uses (no encode pool): loaded the
        first time a role needs it, then kept, so switching away and back loads nothing."""
        model_dir = getattr(opts, "image_encoder_dir", None)
        if model_dir is None or self.loaded.image_spec is None:
            return None
        if self._inproc is None:
            if self.vision is not None:
                self._inproc = InProcessEncoder(self.vision)
            else:
                self._inproc = InProcessEncoder.from_model_dir(model_dir, self.loaded.model.dtype)
                self.vision = self._inproc.encoder
        return self._inproc

    def _layout(self):
        """The KV layout of the current role (None for encode: it holds no KV cache)."""
        core = getattr(self.impl, "core", None)
        return getattr(core, "layout", None)

    def _fence(self, epoch: int | None, *roles: Role) -> None:
        if self._switching:
            raise StaleEpochError(f"worker {self.worker_id} is switching role")
        if epoch is not None and epoch != self.epoch:
            raise StaleEpochError(f"worker {self.worker_id} is at epoch {self.epoch}, the call was for epoch {epoch}")
        if self.role not in roles:
            raise StaleEpochError(f"worker {self.worker_id} is a {self.role.value} worker, the call needs "
                                  f"{'/'.join(r.value for r in roles)}")

    # ------------------------------------------------------------ role
    async def set_role(self, role: Role, epoch: int) -> tuple[object, object, float]:
        """Switch to `role` as `epoch`; returns (info, KV layout, seconds the switch took)."""
        if role not in self.options:
            raise RoleSwitchError(f"worker {self.worker_id} cannot take role {role.value} "
                                  f"(it can be {', '.join(r.value for r in self.options)})")
        if epoch <= self.epoch:
            raise RoleSwitchError(f"worker {self.worker_id} is at epoch {self.epoch}; refusing epoch {epoch}")
        if self._switching:
            raise RoleSwitchError(f"worker {self.worker_id} is already switching role")
        if not await self.impl.idle():
            raise RoleSwitchError(f"worker {self.worker_id} is not idle; drain it before switching its role")
        t0 = time.monotonic()
        self._switching = True
        try:
            old = self.impl
            await old.shutdown()
            _stop(old)
            self.role = role
            self.impl = self._build(role)
            self.epoch = epoch
        finally:
            self._switching = False
        return self.impl.info, self._layout(), time.monotonic() - t0

    async def roles(self) -> tuple[Role, ...]:
        """The roles this worker can take (the router checks before it drains a worker)."""
        return tuple(self.options)

    async def weights_id(self) -> int:
        """Address of the first weight tensor: unchanged by a role switch (no reload)."""
        return next(self.loaded.model.parameters()).data_ptr()

    async def vision_weights_id(self) -> int | None:
        """Address of the vision tower's first weight tensor (None: no vision tower here)."""
        return None if self.vision is None else next(self.vision.vision.parameters()).data_ptr()

    # ------------------------------------------------------------ every role
    async def ready(self):
        """(info, KV layout); in the encode role info alone, as a plain encode worker answers."""
        return await self.impl.ready()     # raises WorkerLoopDied once the inner worker's loop died

    async def status(self):
        return await self.impl.status()

    async def idle(self) -> bool:
        return await self.impl.idle()

    async def cancel(self, request_id: str) -> bool:
        return await self.impl.cancel(request_id)

    async def shutdown(self) -> None:
        await self.impl.shutdown()

    async def close(self) -> None:
        """What the controller calls on an encode worker at teardown."""
        await self.impl.shutdown()

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

    # ------------------------------------------------------------ decode / colocated roles
    async def reserve(self, request_id: str, num_prompt_tokens: int, lease_s: float | None = None,
                      epoch: int | None = None):
        self._fence(epoch, Role.DECODE)
        return await self.impl.reserve(request_id, num_prompt_tokens, lease_s)

    async def activate(self, request_id: str, prompt_token_ids, first_token: int, sampling, epoch: int | None = None,
                       resume: tuple[int, int] | None = None):
        self._fence(epoch, Role.DECODE)
        return await self.impl.activate(request_id, prompt_token_ids, first_token, sampling, resume)

    async def submit(self, request_id: str, prompt_token_ids, sampling, epoch: int | None = None,
                     images: tuple[bytes, ...] = (), resume: tuple[int, int] | None = None, tenant: str = "") -> None:
        self._fence(epoch, Role.COLOCATED, Role.DECODE)
        await self.impl.submit(request_id, prompt_token_ids, sampling, images, resume, tenant)

    async def poll(self, timeout_s: float = 1.0, epoch: int | None = None):
        """Step messages of a decode / colocated worker; a poll for an older epoch (a router's
        poller of a handle that a switch retired) raises StaleEpochError."""
        self._fence(epoch, Role.DECODE, Role.COLOCATED)
        return await self.impl.poll(timeout_s)


def _stop(worker: PrefillWorker | DecodeWorker | EncodeWorker) -> None:
    """Stop a retired inner worker's background loop and executor thread."""
    task = getattr(worker, "_loop_task", None)
    if task is not None and not task.done():
        task.cancel()
    executor = getattr(worker, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=False)
    # Wake anything still waiting on the old worker's events so it sees the cancellation.
    for name in ("_has_output", "_has_work", "_wake"):
        event = getattr(worker, name, None)
        if isinstance(event, asyncio.Event):
            event.set()
