"""The router: owns every request's lifecycle, in the gateway's process.

Disaggregated path of one request:

    admit (tokenize, limits, backpressure; images decoded to check them, their tokens expanded)
      → reserve KV blocks on the least-loaded decode worker that has room   (waits while none has)
      → [images] the prefill worker opens one receive per encode shard, the encode workers send
        the features straight to it (encode_workers/parallel.py)
      → prefill on the prefill worker with the shortest queue; it streams the prompt's K/V into
        the reserved blocks layer by layer and returns token 1        (a dead prefill worker: retry)
      → activate on the decode worker → TokenEvent(token 1)
      → TokenEvents from the decode worker's step messages → FinalEvent

Colocated path: submit to the least-loaded colocated worker → TokenEvents → FinalEvent.

Every wait is bounded by the request's deadline. A decode worker that dies ends its requests with
FinalEvent(ERROR) naming the worker; nothing waits forever. Closing a stream early aborts the
request on whichever worker holds it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from cluster.router_api import ChatMessage, ClusterStatus, ErrorKind, FinalEvent, GenerateInput, ModelInfo, Prepared, RoleSwitch, Router, RouterError, Timings, TokenEvent
from engine.worker_api import Role, WorkerStatus
from cluster.fair_share import FairShare
from encode_workers.parallel import encode_parallel, plan_shards
from encode_workers.transfer import EncodeShard
from engine import multimodal
from engine.errors import EngineError, OutOfKVCacheError, WorkerLoopDied
from engine.llm_engine import RequestValidator
from engine.sequence import FinishReason, StepOutput
from prefill_workers.prefill_core import PrefillTask

log = logging.getLogger(__name__)
RESERVE_RETRY_S = 0.02
POLL_S = 0.5
SWITCH_HISTORY = 256


@dataclass(eq=False)
class WorkerHandle:
    worker_id: str
    role: Role
    actor: object
    node_id: str = ""
    alive: bool = True
    inflight: int = 0
    epoch: int = 0                   # restarts and role switches of this worker id (each + 1)
    draining: bool = False           # a role switch is waiting for its requests to end: no new work
    retired: bool = False            # replaced by a handle of a newer epoch (role switch)

    @property
    def serving(self) -> bool:
        return self.alive and not self.draining and not self.retired


@dataclass(eq=False)
class _Flight:
    """One request in flight. `events` carries StepOutputs, or an Exception that ends it."""

    request_id: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    decode: WorkerHandle | None = None
    prefill: WorkerHandle | None = None
    images: tuple[bytes, ...] = ()   # in prompt order: top-level images, or the messages' in turn
    resume: tuple[int, int] | None = None   # re-prefilled: (output tokens in the prompt, chars sent)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)   # abort() before its first token too


def _is_stale(exc: BaseException) -> bool:
    """The worker refused a call meant for an older epoch / another role (cluster/role_worker.py)."""
    from cluster.role_worker import StaleEpochError

    cause = getattr(exc, "cause", None)
    return isinstance(exc, StaleEpochError) or isinstance(cause, StaleEpochError)


def _is_actor_death(exc: BaseException) -> bool:
    """Ray says the worker's process is gone, or the worker says its step loop died (it is then
    as good as dead: the supervisor kills and replaces it)."""
    import ray.exceptions as rex

    # OutOfMemoryError: Ray's memory monitor killed the worker's process mid-call.
    if isinstance(exc, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError, rex.OutOfMemoryError)):
        return True
    return isinstance(exc, WorkerLoopDied) or isinstance(getattr(exc, "cause", None), WorkerLoopDied)


class ClusterRouter(Router):
    def __init__(self, *, mode: str, tokenizer, model_info: ModelInfo, kv_capacity_tokens: int,
                 prefill: list[WorkerHandle], decode: list[WorkerHandle], max_inflight: int,
                 default_timeout_s: float, on_shutdown=None, encode: list[WorkerHandle] = (),
                 image_token_id: int | None = None, tokens_per_image: int = 0,
                 reprefill_on_decode_failure: bool = False, max_image_pixels: int | None = None,
                 seqs_per_worker: int = 0) -> None:
        """encode / image_token_id / tokens_per_image: a vision-language model's encode pool, its
        image placeholder token and how many placeholders one image's features fill.
        reprefill_on_decode_failure: a request whose decode worker dies is prefilled again
        (prompt + tokens so far) on live workers and goes on, instead of ending with an error.
        seqs_per_worker: sequences one decode / colocated worker runs at once (engine.max_num_seqs):
        the decode slots shared fairly among tenants (cluster/fair_share.py); 0: not shared out."""
        self.mode = mode
        self.tokenizer = tokenizer
        self._info = model_info
        self.validator = RequestValidator(tokenizer, model_info.max_model_len, kv_capacity_tokens)
        self.prefill = prefill
        self.decode = decode
        self.encode = encode if isinstance(encode, list) else list(encode)  # the supervisor swaps into it
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image
        self.max_image_pixels = max_image_pixels   # images larger than this are refused before decoding
        self.max_inflight = max_inflight
        self.seqs_per_worker = seqs_per_worker
        self.slots = FairShare(self._decode_slots)
        self.default_timeout_s = default_timeout_s
        self._flights: dict[str, _Flight] = {}
        self._ids = itertools.count()
        self._pollers: list[asyncio.Task] = []
        self._reapers: list[asyncio.Task] = []   # segment clean-ups after a worker death (shutdown waits)
        self._on_shutdown = on_shutdown
        self.supervisor = None           # the controller's Supervisor (cluster/supervisor.py), if any
        self.policy = None               # the role policy (cluster/role_policy.py) when role switching is on
        self.reprefill_on_decode_failure = reprefill_on_decode_failure
        self.switches: collections.deque[RoleSwitch] = collections.deque(maxlen=SWITCH_HISTORY)
        self.switch_count = 0
        self._switch_lock = asyncio.Lock()
        # (end time, ttft_s, tpot_s, completion tokens, completed) of recent requests (role policy).
        self.recent: collections.deque[tuple[float, float, float, int, bool]] = collections.deque(maxlen=4096)

    def _decode_slots(self) -> int:
        """Sequences the live decode (or colocated) workers can run at once; 0: unbounded."""
        return self.seqs_per_worker * sum(w.serving for w in self.decode)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._pollers = [loop.create_task(self._poll(w)) for w in self.decode]

    # ------------------------------------------------------------------ worker messages
    async def _poll(self, worker: WorkerHandle) -> None:
        """Route one decode worker's step messages to their requests; fail them if it dies."""
        while worker.alive and not worker.retired:
            try:
                messages: list[list[StepOutput]] = await worker.actor.poll.remote(POLL_S, epoch=worker.epoch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _is_actor_death(exc):
                    self._worker_died(worker, exc)
                    return
                if _is_stale(exc):          # switched away (or switching): this handle is done
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

    def mark_dead(self, worker: WorkerHandle, exc: BaseException) -> None:
        """A health check saw the worker's actor die: fail its requests as if a call had."""
        self._worker_died(worker, exc)

    def replace_worker(self, old: WorkerHandle, actor, node_id: str) -> WorkerHandle:
        """Swap a ready replacement actor in for a dead worker (same id, epoch + 1).

        A new handle, not the old one revived: requests still holding the old handle keep
        failing against the dead actor instead of reaching a replacement that never saw them."""
        assert not old.alive, f"{old.worker_id} is alive; only a dead worker is replaced"
        pool = self._pool(old.role)
        new = WorkerHandle(old.worker_id, old.role, actor, node_id, epoch=old.epoch + 1)
        pool[pool.index(old)] = new
        if new.role not in (Role.PREFILL, Role.ENCODE):
            self._pollers = [t for t in self._pollers if not t.done()]
            self._pollers.append(asyncio.get_running_loop().create_task(self._poll(new)))
        return new

    def _worker_died(self, worker: WorkerHandle, exc: BaseException) -> None:
        if not worker.alive:
            return
        worker.alive = False
        log.error("worker %s died: %s", worker.worker_id, exc)
        self._reapers = [t for t in self._reapers if not t.done()]
        self._reapers.append(asyncio.get_running_loop().create_task(_reap_segments()))
        for flight in list(self._flights.values()):
            if flight.decode is worker:
                flight.events.put_nowait(_DecodeDied(
                    f"{worker.role.value} worker {worker.worker_id} died while serving this request"))

    # ------------------------------------------------------------------ admission
    def _images(self, request: GenerateInput) -> tuple[bytes, ...]:
        """The request's images in prompt order, each decoded once so bad bytes fail here."""
        images = tuple(request.images) + tuple(b for m in request.messages or () for b in m.images)
        if images and not self._info.supports_images:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, f"model {self._info.name} does not accept images",
                              "images_not_supported")
        if request.images and request.messages is not None:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, "with messages, images go in the messages, not the request")
        for i, data in enumerate(images):
            try:
                multimodal.decode_image(data, i, self.max_image_pixels)
            except EngineError as exc:
                raise RouterError(ErrorKind.INVALID_ARGUMENT, str(exc), "bad_image") from None
        return images

    def _chat(self, messages) -> list[dict]:
        """Chat messages for the template; a message's images become image tokens before its text
        ("<image>\n..." as LLaVA's chat format has them)."""
        token = self.tokenizer.decode([self.image_token_id]) if self.image_token_id is not None else ""
        return [{"role": m.role, "content": (token * len(m.images) + "\n" if m.images else "") + m.content}
                for m in messages]

    def _prompt_ids(self, request: GenerateInput, images: tuple[bytes, ...] = ()) -> list[int]:
        """Token ids as the workers see them: with images, each image token expanded."""
        if request.messages is not None:
            prompt = self._chat(request.messages)
        elif request.token_ids is not None:
            prompt = list(request.token_ids)
        elif request.prompt is not None:
            prompt = request.prompt
        else:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, "request has no prompt, messages or token_ids")
        try:
            ids = self.validator.tokenize(prompt)
            if images:
                ids = multimodal.expand_image_tokens(ids, self.image_token_id, len(images), self.tokens_per_image)
            self.validator.check(ids, request.sampling)
        except OutOfKVCacheError as exc:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, str(exc), "prompt_too_long") from None
        except EngineError as exc:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, str(exc), "bad_prompt") from None
        except Exception:          # the tokenizer or chat template choked on this input
            log.exception("tokenizing request %s failed", request.request_id)
            raise RouterError(ErrorKind.INVALID_ARGUMENT, "the prompt could not be tokenized", "bad_prompt") from None
        return ids

    def prepare(self, request: GenerateInput) -> Prepared:
        """Decode the images (checking them) and tokenize: no side effect, safe on any thread."""
        images = self._images(request)
        return Prepared(tuple(self._prompt_ids(request, images)), images)

    def _admit(self, request: GenerateInput, prepared: Prepared) -> _Flight:
        if len(self._flights) >= self.max_inflight:
            raise RouterError(ErrorKind.RESOURCE_EXHAUSTED,
                              f"the server has {len(self._flights)} requests in flight (limit {self.max_inflight}); "
                              f"retry later", "server_busy")
        if request.request_id in self._flights:
            raise RouterError(ErrorKind.INVALID_ARGUMENT, f"request id {request.request_id!r} is already in flight",
                              "duplicate_request_id")
        pool = self.decode
        if not any(w.serving for w in pool) or (self.mode == "disaggregated" and not any(w.serving for w in self.prefill)):
            raise RouterError(ErrorKind.UNAVAILABLE, "no live worker can serve this request", "no_worker")
        flight = _Flight(request.request_id or f"req-{next(self._ids)}", images=prepared.images)
        self._flights[flight.request_id] = flight
        return flight

    def apply_chat_template(self, messages) -> list[int]:
        """Token ids of a chat, one image token per image (before expansion)."""
        return self.validator.tokenize(self._chat(messages))

    def count_tokens(self, messages) -> int:
        return len(self.apply_chat_template(messages)) + sum(len(m.images) for m in messages) * (self.tokens_per_image - 1)

    def estimate_tokens(self, message: ChatMessage) -> int:
        text = len(self.tokenizer(message.content).input_ids) if message.content else 0
        return text + len(message.images) * self.tokens_per_image

    # ------------------------------------------------------------------ the stream
    def generate(self, request: GenerateInput, prepared: Prepared | None = None
                 ) -> AsyncIterator[TokenEvent | FinalEvent]:
        prepared = prepared if prepared is not None else self.prepare(request)
        flight = self._admit(request, prepared)
        return self._stream(request, flight, list(prepared.token_ids))

    async def _stream(self, request: GenerateInput, flight: _Flight, ids: list[int]):
        t0 = time.monotonic()
        # A client's deadline, never past the server's: nothing waits longer than request_timeout_s.
        deadline = t0 + min(request.deadline_s or self.default_timeout_s, self.default_timeout_s)
        timings: dict[str, float] = {}
        tokens: list[int] = []
        text: list[str] = []
        first_at = last_at = None
        reason, error, kind = None, None, None
        resumes = 0
        slot = False
        try:
            if self.seqs_per_worker:
                slot = await self._unless_aborted(flight, self.slots.acquire(request.tenant, deadline - t0))
                if not slot:
                    raise RouterError(ErrorKind.DEADLINE_EXCEEDED,
                                      "request deadline exceeded waiting for a decode slot (the cluster is full)")
                timings["queue_s"] = time.monotonic() - t0
            try:
                out = await self._unless_aborted(flight, self._start(request, flight, ids, deadline, timings))
            except _DecodeDied:
                if not self._may_resume(request, tokens, resumes):
                    raise
                resumes += 1
                out = await self._unless_aborted(
                    flight, self._resume(request, flight, ids, tokens, len("".join(text)), deadline, timings))
            while True:
                if out is not None:
                    if out.finish_reason is FinishReason.ERROR:   # the worker failed this request alone
                        raise RouterError(ErrorKind.INTERNAL, out.error or "the worker failed this request")
                    now = time.monotonic()
                    first_at = first_at or now
                    last_at = now
                    tokens.extend(out.new_token_ids)
                    text.append(out.new_text)
                    yield TokenEvent(tuple(out.new_token_ids), out.new_text)
                    if out.finished:
                        reason = out.finish_reason
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RouterError(ErrorKind.DEADLINE_EXCEEDED,
                                      f"request deadline of {deadline - t0:.1f}s exceeded after {len(tokens)} tokens")
                try:
                    out = await asyncio.wait_for(flight.events.get(), remaining)
                except asyncio.TimeoutError:
                    out = None
                    continue
                while isinstance(out, _DecodeDied) and self._may_resume(request, tokens, resumes):
                    resumes += 1
                    try:
                        out = await self._unless_aborted(
                            flight, self._resume(request, flight, ids, tokens, len("".join(text)), deadline, timings))
                    except _DecodeDied as again:
                        out = again
                if isinstance(out, BaseException):
                    raise out
        except _Aborted:
            reason = FinishReason.ABORT
        except RouterError as exc:
            reason, error, kind = FinishReason.ERROR, exc.message, exc.kind
        except asyncio.CancelledError:
            reason = FinishReason.ABORT
            raise
        except Exception:
            log.exception("request %s failed", flight.request_id)
            reason, error, kind = FinishReason.ERROR, "internal error", ErrorKind.INTERNAL
        finally:
            self._flights.pop(flight.request_id, None)
            if slot:
                self.slots.release(request.tenant)
            if reason is None or reason in (FinishReason.ABORT, FinishReason.ERROR):
                await self._release(flight)
            for w in (flight.decode, flight.prefill):
                if w is not None:
                    w.inflight -= 1
        if reason is None:  # the consumer closed the stream early: aborted, nothing more to send
            return
        end = time.monotonic()
        n = len(tokens)
        ttft = (first_at - t0) if first_at else end - t0
        tpot = ((last_at - first_at) / (n - 1)) if first_at and n > 1 else 0.0
        self.recent.append((end, ttft, tpot, n, reason in (FinishReason.STOP, FinishReason.LENGTH)))
        yield FinalEvent(
            reason, len(ids), n, "".join(text),
            Timings(queue_s=timings.get("queue_s", 0.0), encode_s=timings.get("encode_s", 0.0), prefill_s=timings.get("prefill_s", 0.0),
                    transfer_s=timings.get("transfer_s", 0.0),
                    decode_s=(last_at - first_at) if first_at else 0.0,
                    ttft_s=(first_at - t0) if first_at else 0.0,
                    tpot_s=((last_at - first_at) / (n - 1)) if first_at and n > 1 else 0.0,
                    e2e_s=end - t0),
            error, kind)

    @staticmethod
    async def _unless_aborted(flight: _Flight, coro):
        """Await `coro`, unless the request is aborted first: then cancel it (which gives back
        what it holds: a decode slot, a reservation, a queued prefill) and raise _Aborted. Lets an
        abort end a request waiting for a slot, for KV space or in the prefill queue."""
        task = asyncio.ensure_future(coro)
        aborted = asyncio.ensure_future(flight.aborted.wait())
        try:
            await asyncio.wait({task, aborted}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            aborted.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise _Aborted()
        return task.result()

    async def _start(self, request, flight, ids, deadline, timings) -> StepOutput | None:
        if self.mode == "disaggregated":
            return await self._prefill_and_activate(request, flight, ids, deadline, timings)
        return await self._submit(request, flight, ids, deadline)

    def _may_resume(self, request: GenerateInput, tokens: list[int], resumes: int) -> bool:
        return (self.reprefill_on_decode_failure and resumes < max(1, len(self.decode))
                and len(tokens) < request.sampling.max_tokens)

    async def _resume(self, request, flight, ids, tokens, sent_chars, deadline, timings) -> StepOutput | None:
        """Re-prefill a request whose decode worker died: prompt + the tokens it already streamed,
        on live workers, for the tokens it has left. Greedy output is the same as without the
        failure, and so is seeded sampled output (the new workers skip the seed's draws of the
        tokens already streamed). The new worker decodes text over the whole output (`resume`):
        text it had held back is delivered and a stop string spanning the resume point still
        ends the request."""
        if flight.decode is not None:
            flight.decode.inflight -= 1
            flight.decode = None
        while not flight.events.empty():    # outputs of the dead worker that arrived late
            stale = flight.events.get_nowait()
            if isinstance(stale, _Aborted):
                raise stale
        log.warning("request %s: decode worker died after %d tokens; prefilling it again",
                    flight.request_id, len(tokens))
        sampling = dataclasses.replace(request.sampling, max_tokens=request.sampling.max_tokens - len(tokens))
        flight.resume = (len(tokens), sent_chars)
        return await self._start(dataclasses.replace(request, sampling=sampling), flight, list(ids) + list(tokens),
                                 deadline, timings)

    async def _release(self, flight: _Flight) -> None:
        """Abort wherever the request may still hold something; a dead worker holds nothing."""
        for worker, method in ((flight.prefill, "cancel"), (flight.decode, "cancel")):
            if worker is None or not worker.alive:
                continue
            try:
                await asyncio.wait_for(getattr(worker.actor, method).remote(flight.request_id), 10.0)
            except Exception as exc:
                log.warning("cancel of %s on %s failed: %s", flight.request_id, worker.worker_id, exc)

    async def _bounded(self, ref, deadline: float, what: str):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RouterError(ErrorKind.DEADLINE_EXCEEDED, f"request deadline exceeded before {what}")
        try:
            return await asyncio.wait_for(ref, remaining)
        except asyncio.TimeoutError:
            raise RouterError(ErrorKind.DEADLINE_EXCEEDED, f"request deadline exceeded during {what}") from None

    async def _submit(self, request, flight, ids, deadline) -> None:
        worker = min((w for w in self.decode if w.serving), key=lambda w: w.inflight, default=None)
        if worker is None:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live colocated worker")
        flight.decode = worker
        worker.inflight += 1
        try:
            await self._bounded(worker.actor.submit.remote(flight.request_id, ids, request.sampling, epoch=worker.epoch,
                                                           **({"images": flight.images} if flight.images else {}),
                                                           **({"resume": flight.resume} if flight.resume else {}),
                                                           **({"tenant": request.tenant} if request.tenant else {})),
                                deadline, "submit")
        except RouterError:
            raise
        except Exception as exc:
            if _is_actor_death(exc):
                self._worker_died(worker, exc)
                raise RouterError(ErrorKind.UNAVAILABLE, f"colocated worker {worker.worker_id} died") from None
            raise
        return None

    async def _reserve(self, flight, ids, deadline, timings):
        t = time.monotonic()
        while True:
            for worker in sorted((w for w in self.decode if w.serving), key=lambda w: w.inflight):
                # Count the reservation before awaiting it: concurrent admissions must see it,
                # or they all pick the same worker.
                worker.inflight += 1
                try:
                    lease = max(1.0, deadline - time.monotonic())
                    desc = await self._bounded(
                        worker.actor.reserve.remote(flight.request_id, len(ids), lease, epoch=worker.epoch),
                        deadline, "KV reservation")
                except BaseException as exc:
                    worker.inflight -= 1
                    if isinstance(exc, (asyncio.CancelledError, RouterError)) and worker.alive:
                        # Cancelled or out of time while the call was in flight: the worker may
                        # hold (or be about to hold) the blocks. Its calls run in arrival order,
                        # so a cancel sent now lands after the reserve and frees them at once
                        # instead of at the lease's end.
                        worker.actor.cancel.remote(flight.request_id)
                    if isinstance(exc, Exception) and _is_actor_death(exc):
                        self._worker_died(worker, exc)
                        continue
                    if isinstance(exc, Exception) and _is_stale(exc):  # its role changed meanwhile
                        continue
                    raise
                if desc is not None:
                    flight.decode = worker
                    timings["queue_s"] = timings.get("queue_s", 0.0) + time.monotonic() - t
                    return worker, desc
                worker.inflight -= 1
            if not any(w.serving for w in self.decode):
                raise RouterError(ErrorKind.UNAVAILABLE, "no live decode worker")
            if time.monotonic() + RESERVE_RETRY_S >= deadline:
                raise RouterError(ErrorKind.DEADLINE_EXCEEDED, "request deadline exceeded waiting for decode KV space")
            await asyncio.sleep(RESERVE_RETRY_S)

    async def _prefill_and_activate(self, request, flight, ids, deadline, timings) -> StepOutput:
        attempts = 0
        while True:
            decode, desc = await self._reserve(flight, ids, deadline, timings)
            prefill = min((w for w in self.prefill if w.serving), key=lambda w: w.inflight, default=None)
            if prefill is None:
                raise RouterError(ErrorKind.UNAVAILABLE, "no live prefill worker")
            flight.prefill = prefill
            prefill.inflight += 1
            try:
                # With an encode pool its workers send the features (EPD); without one the prefill
                # worker gets the image bytes and encodes them itself.
                shards = await self._encode(flight, prefill, deadline, timings) if flight.images and self.encode else ()
                task = PrefillTask(flight.request_id, tuple(ids), request.sampling, desc, image_shards=shards,
                                   images=() if self.encode else flight.images,
                                   sampled_before=flight.resume[0] if flight.resume else 0, tenant=request.tenant)
                result = await self._bounded(prefill.actor.prefill.remote(task, epoch=prefill.epoch), deadline, "prefill")
            except (RouterError, asyncio.CancelledError):
                # Out of time, aborted or failed: take it out of the worker's queue if still there
                # (its calls run in order, so this lands after the prefill call).
                prefill.actor.cancel.remote(flight.request_id)
                raise
            except Exception as exc:
                if not (_is_actor_death(exc) or _is_stale(exc)):
                    raise
                # Prefill is idempotent: drop the reservation and run it again elsewhere.
                if _is_actor_death(exc):
                    self._worker_died(prefill, exc)
                attempts += 1
                prefill.inflight -= 1
                flight.prefill = None
                await self._release(flight)
                decode.inflight -= 1
                flight.decode = None
                if attempts > len(self.prefill):
                    raise RouterError(ErrorKind.UNAVAILABLE, f"prefill failed on {attempts} workers") from None
                continue
            finally:
                if flight.prefill is prefill:
                    prefill.inflight -= 1
                    flight.prefill = None
            if result.first_token is None:
                if not decode.alive:  # the transfer failed because its target died
                    raise _DecodeDied(f"decode worker {decode.worker_id} died")
                raise RouterError(ErrorKind.INTERNAL, result.error or "the prefill failed", "prefill_failed")
            timings["queue_s"] += result.queue_s
            timings["prefill_s"] = result.prefill_s
            timings["transfer_s"] = result.transfer_s
            if result.encode_s:
                timings["encode_s"] = result.encode_s
            try:
                return await self._bounded(
                    decode.actor.activate.remote(flight.request_id, ids, result.first_token, request.sampling,
                                                 epoch=decode.epoch,
                                                 **({"resume": flight.resume} if flight.resume else {})),
                    deadline, "decode activation")
            except RouterError:
                raise
            except Exception as exc:
                if _is_actor_death(exc):
                    self._worker_died(decode, exc)
                    raise _DecodeDied(f"decode worker {decode.worker_id} died") from None
                if _is_stale(exc):
                    raise RouterError(ErrorKind.UNAVAILABLE, f"decode worker {decode.worker_id} changed role") from None
                log.error("decode activation of %s on %s failed: %r", flight.request_id, decode.worker_id, exc)
                raise RouterError(ErrorKind.INTERNAL, "the decode worker could not start this request",
                                  "activation_failed") from None

    async def _encode(self, flight: _Flight, prefill: WorkerHandle, deadline: float, timings
                      ) -> tuple[EncodeShard, ...]:
        """Have the encode workers send the request's image features to `prefill`; its shards.

        Only a dead *prefill* worker propagates as an actor death (the caller retries prefill
        elsewhere); encode failures become RouterErrors and the prepared receives are closed."""
        workers = [w for w in self.encode if w.serving]
        if not workers:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live encode worker")
        images = list(flight.images)
        plan = plan_shards(flight.request_id, images, len(workers))
        shards = [s for _, s in plan]
        descs = await self._bounded(prefill.actor.prepare_images.remote(shards, epoch=prefill.epoch), deadline,
                                    "image receive setup")
        t = time.monotonic()
        busy = [workers[w] for w, _ in plan]
        for w in busy:                       # the policy's encode queue; a draining worker waits for 0
            w.inflight += 1
        try:
            await self._bounded(encode_parallel([w.actor for w in workers], plan, images, descs,
                                                epochs=[w.epoch for w in workers]), deadline, "image encoding")
        except BaseException as exc:
            try:
                await asyncio.wait_for(prefill.actor.release_images.remote(shards), 10.0)
            except Exception as rel:
                log.warning("releasing image receives of %s failed: %s", flight.request_id, rel)
            if not isinstance(exc, Exception) or isinstance(exc, RouterError):
                raise
            if _is_actor_death(exc):
                await self._reap_encode([workers[w] for w, _ in plan])
                log.error("an encode worker died encoding %s: %r", flight.request_id, exc)
                raise RouterError(ErrorKind.UNAVAILABLE, "an encode worker died while encoding this request's images",
                                  "worker_died") from None
            if _is_stale(exc):               # switched role between the pick and the call
                raise RouterError(ErrorKind.UNAVAILABLE, "an encode worker changed role; retry", "worker_switched") from None
            log.error("image encoding of %s failed: %r", flight.request_id, exc)
            raise RouterError(ErrorKind.INTERNAL, "image encoding failed", "encode_failed") from None
        finally:
            for w in busy:
                w.inflight -= 1
        timings["encode_s"] = time.monotonic() - t
        return tuple(shards)

    async def _reap_encode(self, workers: list[WorkerHandle]) -> None:
        """Mark dead the encode workers that Ray says are dead (an encode call failed with a death)."""
        pings = await asyncio.gather(*(asyncio.wait_for(w.actor.ready.remote(), 5.0) for w in workers),
                                     return_exceptions=True)
        for w, ping in zip(workers, pings):
            if isinstance(ping, BaseException) and _is_actor_death(ping):
                w.alive = False
                log.error("encode worker %s died: %s", w.worker_id, ping)

    # ------------------------------------------------------------------ control
    async def abort(self, request_id: str) -> bool:
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        flight.aborted.set()                 # ends a wait for a slot, KV space or prefill
        flight.events.put_nowait(_Aborted())  # ends the decode phase
        return True

    def model_info(self) -> ModelInfo:
        return self._info

    # ------------------------------------------------------------------ role switching
    def find_worker(self, worker_id: str) -> WorkerHandle | None:
        for w in self.encode + self.prefill + self.decode:
            if w.worker_id == worker_id and not w.retired:
                return w
        return None

    def _pool(self, role: Role) -> list[WorkerHandle]:
        """The list a worker of `role` lives in (colocated workers sit in `decode`)."""
        return {Role.ENCODE: self.encode, Role.PREFILL: self.prefill}.get(role, self.decode)

    async def worker_roles(self, worker: WorkerHandle) -> frozenset[Role]:
        """The roles a worker can take (what it loaded at start); its own role if it cannot say."""
        try:
            return frozenset(await asyncio.wait_for(worker.actor.roles.remote(), 10.0))
        except Exception as exc:
            if _is_actor_death(exc):
                self._worker_died(worker, exc)
            return frozenset({worker.role})

    async def set_worker_role(self, worker_id: str, role: Role, reason: str = "manual",
                              drain_timeout_s: float = 60.0) -> RoleSwitch:
        """Move a worker between the prefill and decode pools, or between the encode and prefill
        pools (a vision-language deployment whose workers hold both halves of the model,
        `role_switching.encode_prefill`), without reloading its weights.

            checks (disaggregated, alive, a move it can make, another worker stays in its pool)
            ─▶ drain: no new work, wait until its requests end and it holds nothing (bounded; on
            timeout it serves again) ─▶ set_role(role, epoch + 1) on the worker ─▶ a new handle
            (that epoch) in the other pool; the old handle is retired, so its poller stops and
            its epoch is refused.

        Raises RouterError: INVALID_ARGUMENT (unknown worker / role), FAILED_PRECONDITION (the
        switch would empty a pool, the worker cannot take that role, is dead or still busy,
        another switch runs)."""
        if self.mode != "disaggregated":
            raise RouterError(ErrorKind.FAILED_PRECONDITION, "role switching needs a disaggregated deployment")
        if role not in (Role.ENCODE, Role.PREFILL, Role.DECODE):
            raise RouterError(ErrorKind.INVALID_ARGUMENT,
                              f"a worker can switch to encode, prefill or decode, not {role.value}")
        if self._switch_lock.locked():
            raise RouterError(ErrorKind.FAILED_PRECONDITION, "another role switch is in progress")
        async with self._switch_lock:
            worker = self.find_worker(worker_id)
            if worker is None:
                known = ", ".join(w.worker_id for w in self.encode + self.prefill + self.decode if not w.retired)
                raise RouterError(ErrorKind.INVALID_ARGUMENT, f"no worker {worker_id!r} (workers: {known})")
            if worker.role is role:
                raise RouterError(ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} already is a {role.value} worker")
            if not worker.alive:
                raise RouterError(ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} is dead")
            if Role.DECODE in (worker.role, role) and Role.ENCODE in (worker.role, role):
                raise RouterError(ErrorKind.FAILED_PRECONDITION,
                                  f"worker {worker_id}: switches go between prefill and decode or between encode and "
                                  f"prefill; move it to prefill first")
            if role not in await self.worker_roles(worker):
                held = "only the vision tower" if worker.role is Role.ENCODE else "no vision tower"
                raise RouterError(ErrorKind.FAILED_PRECONDITION,
                                  f"worker {worker_id} cannot take the {role.value} role: it holds {held} (with "
                                  f"role_switching.encode_prefill: true, encode and prefill workers load both "
                                  f"halves of a vision-language model)")
            src, dst = self._pool(worker.role), self._pool(role)
            if not any(w.serving for w in src if w is not worker):
                raise RouterError(ErrorKind.FAILED_PRECONDITION,
                                  f"worker {worker_id} is the last live {worker.role.value} worker")
            t0 = time.monotonic()
            worker.draining = True
            try:
                drained = await self._drained(worker, drain_timeout_s)
                if not worker.alive:
                    raise RouterError(ErrorKind.UNAVAILABLE, f"worker {worker_id} died while draining")
                if not drained:
                    raise RouterError(ErrorKind.FAILED_PRECONDITION,
                                      f"worker {worker_id} still had requests after {drain_timeout_s:.0f}s of "
                                      f"draining; switch cancelled, it serves as {worker.role.value} again")
                epoch = worker.epoch + 1
                try:
                    info, layout, switch_s = await asyncio.wait_for(worker.actor.set_role.remote(role, epoch), 120.0)
                except asyncio.TimeoutError:
                    raise RouterError(ErrorKind.INTERNAL, f"worker {worker_id} did not switch within 120s") from None
                except Exception as exc:
                    if _is_actor_death(exc):
                        self._worker_died(worker, exc)
                        raise RouterError(ErrorKind.UNAVAILABLE, f"worker {worker_id} died while switching") from None
                    raise RouterError(ErrorKind.FAILED_PRECONDITION, f"worker {worker_id} refused: {exc}") from None
            finally:
                worker.draining = False
            new = WorkerHandle(worker.worker_id, role, worker.actor, info.node_id, epoch=epoch)
            worker.retired = True
            src.remove(worker)
            dst.append(new)
            if role is Role.DECODE:
                self._pollers = [t for t in self._pollers if not t.done()]
                self._pollers.append(asyncio.get_running_loop().create_task(self._poll(new)))
            record = RoleSwitch(worker_id, worker.role, role, time.time(), reason,
                                epoch=epoch, drain_s=time.monotonic() - t0 - switch_s, switch_s=switch_s)
            self.switches.append(record)
            self.switch_count += 1
            log.warning("worker %s switched %s -> %s (epoch %d, drain %.1fs, switch %.2fs): %s", worker_id,
                        worker.role.value, role.value, epoch, record.drain_s, switch_s, reason)
            return record

    async def _drained(self, worker: WorkerHandle, timeout_s: float) -> bool:
        """Wait until no request of this router is on the worker and the worker holds nothing."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if worker.inflight == 0 and not any(f.decode is worker or f.prefill is worker for f in self._flights.values()):
                try:
                    if await asyncio.wait_for(worker.actor.idle.remote(), 10.0):
                        return True
                except Exception as exc:
                    if _is_actor_death(exc):
                        self._worker_died(worker, exc)
                        return False
            await asyncio.sleep(0.05)
        return False

    async def cluster_status(self) -> ClusterStatus:
        async def one(w: WorkerHandle) -> WorkerStatus:
            if w.alive:
                try:
                    return dataclasses.replace(await asyncio.wait_for(w.actor.status.remote(), 5.0), epoch=w.epoch)
                except Exception:
                    pass
            return WorkerStatus(w.worker_id, w.role, w.node_id, False, 0, 0, 0, 0, epoch=w.epoch)

        async def one_encode(w: WorkerHandle) -> WorkerStatus:
            alive = w.alive
            if alive:
                try:
                    await asyncio.wait_for(w.actor.ready.remote(), 5.0)
                except Exception:
                    alive = False
            return WorkerStatus(w.worker_id, Role.ENCODE, w.node_id, alive, w.inflight, w.inflight, 0, 0,
                                epoch=w.epoch)
        workers = await asyncio.gather(*(one_encode(w) for w in self.encode),
                                       *(one(w) for w in self.prefill + self.decode))
        restarts = tuple(sorted(self.supervisor.restarts().items())) if self.supervisor is not None else ()
        return ClusterStatus(self.mode, tuple(workers), tuple(self.switches), switch_count=self.switch_count,
                             restarts=restarts)

    async def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """True once every live worker holds no request and no KV block (used by leak checks)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            states = await asyncio.gather(*(w.actor.idle.remote() for w in self.prefill + self.decode if w.alive),
                                          return_exceptions=True)
            if all(s is True for s in states) and not self._flights:
                return True
            await asyncio.sleep(0.1)
        return False

    async def shutdown(self) -> None:
        for task in self._pollers:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        pending = [t for t in self._reapers if not t.done()]
        if pending:                      # each gives up after ~5 s
            await asyncio.wait(pending, timeout=10)
        if self._on_shutdown is not None:
            await self._on_shutdown()


async def _reap_segments(attempts: int = 50) -> None:
    """Unlink the shared-memory segments a dead worker on this host left behind (its process
    may take a moment to exit after Ray reports it dead)."""
    from kv_transfer.segment import cleanup_stale

    for _ in range(attempts):
        if cleanup_stale():
            return
        await asyncio.sleep(0.1)


class _DecodeDied(RouterError):
    """The worker decoding the request died (before or after its first token)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.UNAVAILABLE, message)


class _Aborted(RouterError):
    def __init__(self) -> None:
        super().__init__(ErrorKind.NOT_FOUND, "aborted")
