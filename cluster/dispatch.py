"""Dispatch: one admitted request's way through the workers, from its Flight to its FinalEvent.

A Flight's state (FlightState, cluster/flight.py) moves forward along one path:

    ADMITTED ─▶ WAITING_SLOT ─▶ RESERVING ─▶ [ENCODING] ─▶ PREFILLING ─▶ ACTIVATING ─▶ DECODING ─▶ ENDED
                (fair decode    (KV blocks on     (encode     (token 1, K/V     (decode worker
                 slot)          a decode worker)   pool)      streamed)         takes it over)
    colocated:  ADMITTED ─▶ WAITING_SLOT ─▶ SUBMITTING ─▶ DECODING ─▶ ENDED
    a decode worker dies with re-prefill on: DECODING ─▶ RESUMING ─▶ RESERVING ... (cluster/resume.py)
    a prefill worker dies or switches role mid-call: PREFILLING ─▶ RESERVING (again, elsewhere)

Every wait is bounded by the request's deadline (never past the server's request_timeout_s) and
ends early on abort. A prefill worker that dies or switches role mid-call: the reservation is
dropped and prefill runs again on another worker (prefill is idempotent). Whatever way the
request ends, `Flight.end()` gives back its leases (cluster/pools.py) and the router cancels it
on any live worker that may still hold something of it. Exactly one FinalEvent ends a stream
that the consumer read to its end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from cluster.fair_share import FairShare
from cluster.flight import Aborted, DecodeDied, Flight, FlightState, timings
from cluster.pools import Lease, Pools, WorkerHandle, is_actor_death, is_stale
from cluster.logs import REQUEST_ID
from cluster.prefix_index import PrefixIndex
from cluster.router_api import ErrorKind, FinalEvent, GenerateInput, RouterError, Timings, TokenEvent
from encode_workers.parallel import encode_parallel, plan_shards
from encode_workers.transfer import EncodeShard
from engine.kv_cache import choices_salt
from engine.sequence import FinishReason, StepOutput
from engine.worker_api import Mode
from prefill_workers.prefill_core import PrefillTask

log = logging.getLogger(__name__)
RESERVE_RETRY_S = 0.02
CANCEL_TIMEOUT_S = 10.0
MAX_CHOICE_GROUPS = 4096  # requests with n > 1 whose first choice's worker is remembered


class Dispatcher:
    def __init__(
        self,
        *,
        mode: Mode,
        pools: Pools,
        flights: dict[str, Flight],
        slots: FairShare,
        slots_on: Callable[[], bool],
        default_timeout_s: float,
        worker_died: Callable[[WorkerHandle, BaseException], None],
        on_end: Callable[[Timings, int, bool], None],
    ) -> None:
        """slots: the fair decode slots, taken while slots_on() (the deployment shares them out). worker_died: the router's handler
        of a worker death seen by a call. on_end(timings, completion tokens, completed): every
        request that ended by itself (the role policy's SLO window)."""
        self.mode = mode
        self.pools = pools
        self.flights = flights
        self.slots = slots
        self.slots_on = slots_on
        self.default_timeout_s = default_timeout_s
        self.worker_died = worker_died
        self.on_end = on_end
        self.resume = None  # cluster/resume.py's Resume, set by the router
        self.prefix_index: PrefixIndex | None = None  # cache-aware routing (engine.prefix_caching on)
        self.max_local_prefill_tokens = 0  # with the index, disaggregated: conditional disaggregation
        self._choices: OrderedDict[str, WorkerHandle] = OrderedDict()  # choices_of -> the first one's worker

    def _hashes(self, request, flight, ids) -> list[bytes]:
        """The prompt's block hashes (the index must be on), once per prompt (Flight.prefix_hashes)."""
        memo = flight.prefix_hashes
        if memo is None or memo[0] != len(ids):
            memo = flight.prefix_hashes = (
                len(ids),
                self.prefix_index.hashes(ids, request.cache_salt, flight.image_hashes),
            )
        return memo[1]

    def _salt(self, request: GenerateInput) -> str:
        """The cache salt a prompt's worker keys its blocks by. Without the prefix index, the
        choices of one request share their prompt's prefill through a salt only they carry,
        cached even where prefix caching is off (engine/kv_cache.py choices_salt); with it, they
        share it through the cache like any request, under the client's salt."""
        if request.choices_of and self.prefix_index is None:
            return choices_salt(request.choices_of)
        return request.cache_salt

    def _pick(self, pool: list[WorkerHandle], request, ids, flight) -> WorkerHandle | None:
        """The worker a prompt goes to: with prefix caching, the one whose cache likely holds most
        of it (a prompt with images: keyed by their content too), weighed against load
        (cluster/prefix_index.py); else the least loaded, except that the choices of one request
        go where the first one went while it serves (its prompt's blocks are cached there)."""
        index = self.prefix_index
        if index is None:
            group = request.choices_of
            worker = self._choices.get(group) if group else None
            if worker is not None and worker.serving and worker in pool:
                self._choices.move_to_end(group)
                return worker
            worker = Pools.least_loaded(pool)
            if group and worker is not None:
                self._choices[group] = worker
                while len(self._choices) > MAX_CHOICE_GROUPS:  # the oldest requests' choices have started
                    self._choices.popitem(last=False)
            return worker
        hashes = self._hashes(request, flight, ids)
        worker = index.pick(pool, hashes)
        if worker is not None:
            index.record(worker, hashes)
        return worker

    def _local_prefill(self, request, flight, ids) -> WorkerHandle | None:
        """Conditional disaggregation: the decode worker that holds most of this prompt's leading
        blocks (a conversation's earlier turns, prompt and answer: `_remember`), when what it
        lacks is at most max_local_prefill_tokens; it then prefills the rest itself and nothing
        moves between workers. None: the prompt goes to a prefill worker as usual."""
        index = self.prefix_index
        if index is None or not self.max_local_prefill_tokens or flight.images or flight.resume:
            return None
        hashes = self._hashes(request, flight, ids)
        best, held = None, 0
        for w in self.pools.decode:
            n = index.overlap(w, hashes) if w.serving else 0
            if n > held:
                best, held = w, n
        if best is None or len(ids) - held * index.block_size > self.max_local_prefill_tokens:
            return None
        return best

    def _remember(self, request, flight, ids, tokens) -> None:
        """A finished request's decode (or colocated) worker keeps its prompt's and its output's
        full blocks cached: the next turn of the conversation finds them there."""
        index, worker = self.prefix_index, flight.decode
        if index is not None and worker is not None:
            index.record(worker, index.hashes(ids + tokens, request.cache_salt, flight.image_hashes, len(ids)))

    # ------------------------------------------------------------------ the stream
    async def stream(self, request: GenerateInput, flight: Flight, ids: list[int]):
        REQUEST_ID.set(flight.request_id)  # on every log record of this request (cluster/logs.py)
        t0 = time.monotonic()
        # A client's deadline, never past the server's: nothing waits longer than request_timeout_s.
        deadline = t0 + min(request.deadline_s or self.default_timeout_s, self.default_timeout_s)
        phases: dict[str, float] = {}
        tokens: list[int] = []
        text: list[str] = []
        first_at = last_at = None
        reason, error, kind = None, None, None
        resume = self.resume
        slot = False
        try:
            if self.slots_on():
                flight.state = FlightState.WAITING_SLOT
                slot = await self.unless_aborted(flight, self.slots.acquire(request.tenant, deadline - t0))
                if not slot:
                    raise RouterError(
                        ErrorKind.DEADLINE_EXCEEDED,
                        "request deadline exceeded waiting for a decode slot (the cluster is full)",
                    )
                phases["queue_s"] = time.monotonic() - t0
            try:
                out = await self.unless_aborted(flight, self.start(request, flight, ids, deadline, phases))
            except DecodeDied as died:
                out = died
            flight.state = FlightState.DECODING
            while True:
                if isinstance(out, DecodeDied):
                    out = await resume.after_death(
                        request, flight, ids, tokens, len("".join(text)), deadline, phases, out
                    )
                    flight.state = FlightState.DECODING
                if isinstance(out, BaseException):
                    raise out
                if out is not None:
                    if out.finish_reason is FinishReason.ERROR:  # the worker failed this request alone
                        raise RouterError(ErrorKind.INTERNAL, out.error or "the worker failed this request")
                    now = time.monotonic()
                    first_at = first_at or now
                    last_at = now
                    flight.cached_tokens = max(flight.cached_tokens, out.cached_tokens)
                    tokens.extend(out.new_token_ids)
                    text.append(out.new_text)
                    yield TokenEvent(tuple(out.new_token_ids), out.new_text, out.logprobs)
                    if out.finished:
                        reason = out.finish_reason
                        self._remember(request, flight, ids, tokens)
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RouterError(
                        ErrorKind.DEADLINE_EXCEEDED,
                        f"request deadline of {deadline - t0:.1f}s exceeded after {len(tokens)} tokens",
                    )
                try:
                    out = await asyncio.wait_for(flight.events.get(), remaining)
                except asyncio.TimeoutError:
                    out = None
        except Aborted:
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
            self.flights.pop(flight.request_id, None)
            if slot:
                self.slots.release(request.tenant)
            try:
                if reason is None or reason in (FinishReason.ABORT, FinishReason.ERROR):
                    await self.cancel_everywhere(flight)
            finally:  # even when the cancel calls are themselves cancelled: no lease outlives the request
                flight.end()
        if reason is None:  # the consumer closed the stream early: aborted, nothing more to send
            return
        t = timings(t0, time.monotonic(), first_at, last_at, len(tokens), phases)
        self.on_end(t, len(tokens), reason in (FinishReason.STOP, FinishReason.LENGTH))
        yield FinalEvent(
            reason, len(ids), len(tokens), "".join(text), t, error, kind, flight.cached_tokens, flight.prefilled_by
        )

    @staticmethod
    async def unless_aborted(flight: Flight, coro):
        """Await `coro`, unless the request is aborted first: then cancel it (which gives back
        what it holds: a decode slot, a reservation, a queued prefill) and raise Aborted. Lets an
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
            raise Aborted()
        return task.result()

    async def start(self, request, flight, ids, deadline, phases) -> StepOutput | None:
        """Get the request onto a decode (or colocated) worker; token 1 when disaggregated."""
        if self.mode is Mode.DISAGGREGATED:
            local = self._local_prefill(request, flight, ids)
            if local is not None and await self._submit(request, flight, ids, deadline, local):
                flight.prefilled_by = "decode"
                return None
            flight.prefilled_by = "prefill"
            return await self._prefill_and_activate(request, flight, ids, deadline, phases)
        await self._submit(request, flight, ids, deadline)
        flight.prefilled_by = "colocated"
        return None

    async def cancel_everywhere(self, flight: Flight) -> None:
        """Abort wherever the request may still hold something; a dead worker holds nothing."""
        for worker in (flight.prefill, flight.decode):
            if worker is None or not worker.alive:
                continue
            try:
                await asyncio.wait_for(worker.actor.cancel.remote(flight.request_id), CANCEL_TIMEOUT_S)
            except Exception as exc:
                log.warning("cancel of %s on %s failed: %s", flight.request_id, worker.worker_id, exc)

    @staticmethod
    async def bounded(ref, deadline: float, what: str):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RouterError(ErrorKind.DEADLINE_EXCEEDED, f"request deadline exceeded before {what}")
        try:
            return await asyncio.wait_for(ref, remaining)
        except asyncio.TimeoutError:
            raise RouterError(ErrorKind.DEADLINE_EXCEEDED, f"request deadline exceeded during {what}") from None

    # ------------------------------------------------------------------ colocated
    async def _submit(self, request, flight, ids, deadline, local: WorkerHandle | None = None) -> bool:
        """The whole request onto a colocated worker, or onto the decode worker `local`
        (_local_prefill). True once it is queued there; False when `local` died or changed role
        before taking it (the request then goes the usual way)."""
        worker = local or self._pick(self.pools.decode, request, ids, flight)
        if worker is None:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live colocated worker")
        flight.state = FlightState.SUBMITTING
        flight.decode_lease = Lease(worker)
        salt = self._salt(request)
        try:
            await self.bounded(
                worker.actor.submit.remote(
                    flight.request_id,
                    ids,
                    request.sampling,
                    epoch=worker.epoch,
                    **({"images": flight.images} if flight.images else {}),
                    **({"resume": flight.resume} if flight.resume else {}),
                    **({"tenant": request.tenant} if request.tenant else {}),
                    **({"cache_salt": salt} if salt else {}),
                ),
                deadline,
                "submit",
            )
        except RouterError:
            raise
        except Exception as exc:
            if is_actor_death(exc):
                self.worker_died(worker, exc)
            if local is not None and (is_actor_death(exc) or is_stale(exc)):
                flight.drop_decode()
                return False
            if is_actor_death(exc):
                raise RouterError(ErrorKind.UNAVAILABLE, f"colocated worker {worker.worker_id} died") from None
            raise
        return True

    # ------------------------------------------------------------------ disaggregated
    async def _reserve(self, request, flight, ids, deadline, phases):
        """KV space on a decode worker: with the prefix index, the workers that likely hold most
        of the prompt first (their cached blocks are not transferred: DecodeCore.reserve), else
        the least loaded first."""
        flight.state = FlightState.RESERVING
        t = time.monotonic()
        index = self.prefix_index
        cached: dict = {}
        hashes: list[bytes] = []
        if index is not None:
            hashes = self._hashes(request, flight, ids)
            cached = {
                "prompt_token_ids": ids,
                **({"cache_salt": request.cache_salt} if request.cache_salt else {}),
                **({"image_hashes": flight.image_hashes} if flight.image_hashes else {}),
            }
        while True:
            order = index.ranked(self.pools.decode, hashes) if cached else Pools.by_load(self.pools.decode)
            for worker in order:
                # Lease before awaiting: concurrent admissions must see it, or they all pick the same worker.
                lease = Lease(worker)
                try:
                    lease_s = max(1.0, deadline - time.monotonic())
                    desc = await self.bounded(
                        worker.actor.reserve.remote(flight.request_id, len(ids), lease_s, epoch=worker.epoch, **cached),
                        deadline,
                        "KV reservation",
                    )
                except BaseException as exc:
                    lease.release()
                    if isinstance(exc, (asyncio.CancelledError, RouterError)) and worker.alive:
                        # Cancelled or out of time while the call was in flight: the worker may
                        # hold (or be about to hold) the blocks. Its calls run in arrival order,
                        # so a cancel sent now lands after the reserve and frees them at once
                        # instead of at the lease's end.
                        worker.actor.cancel.remote(flight.request_id)
                    if isinstance(exc, Exception) and is_actor_death(exc):
                        self.worker_died(worker, exc)
                        continue
                    if isinstance(exc, Exception) and is_stale(exc):  # its role changed meanwhile
                        continue
                    raise
                if desc is not None:
                    flight.decode_lease = lease
                    phases["queue_s"] = phases.get("queue_s", 0.0) + time.monotonic() - t
                    return worker, desc
                lease.release()
            if not any(w.serving for w in self.pools.decode):
                raise RouterError(ErrorKind.UNAVAILABLE, "no live decode worker")
            if time.monotonic() + RESERVE_RETRY_S >= deadline:
                raise RouterError(ErrorKind.DEADLINE_EXCEEDED, "request deadline exceeded waiting for decode KV space")
            await asyncio.sleep(RESERVE_RETRY_S)

    async def _prefill_and_activate(self, request, flight, ids, deadline, phases) -> StepOutput:
        attempts, died = 0, ""
        while True:
            decode, desc = await self._reserve(request, flight, ids, deadline, phases)
            prefill = self._pick(self.pools.prefill, request, ids, flight)
            if prefill is None:
                raise RouterError(ErrorKind.UNAVAILABLE, f"{died}no live prefill worker")
            flight.prefill_lease = Lease(prefill)
            try:
                # With an encode pool its workers send the features (EPD); without one the prefill
                # worker gets the image bytes and encodes them itself.
                with_pool = bool(flight.images and self.pools.encode)
                shards = await self._encode(flight, prefill, deadline, phases) if with_pool else ()
                flight.state = FlightState.PREFILLING
                task = PrefillTask(
                    flight.request_id,
                    tuple(ids),
                    request.sampling,
                    desc,
                    image_shards=shards,
                    images=() if self.pools.encode else flight.images,
                    sampled_before=flight.resume[0] if flight.resume else 0,
                    tenant=request.tenant,
                    cache_salt=self._salt(request),
                    image_hashes=flight.image_hashes,
                )
                result = await self.bounded(
                    prefill.actor.prefill.remote(task, epoch=prefill.epoch), deadline, "prefill"
                )
            except (RouterError, asyncio.CancelledError):
                # Out of time, aborted or failed: take it out of the worker's queue if still there
                # (its calls run in order, so this lands after the prefill call).
                prefill.actor.cancel.remote(flight.request_id)
                raise
            except Exception as exc:
                if not (is_actor_death(exc) or is_stale(exc)):
                    raise
                # Prefill is idempotent: drop the reservation and run it again elsewhere.
                if is_actor_death(exc):
                    self.worker_died(prefill, exc)
                    died = f"prefill worker {prefill.worker_id} died while prefilling this request; "
                attempts += 1
                flight.drop_prefill()
                await self.cancel_everywhere(flight)
                flight.drop_decode()
                if attempts > len(self.pools.prefill):
                    raise RouterError(ErrorKind.UNAVAILABLE, f"prefill failed on {attempts} workers") from None
                continue
            finally:
                flight.drop_prefill()
            if result.first_token is None:
                if not decode.alive:  # the transfer failed because its target died
                    raise DecodeDied(f"decode worker {decode.worker_id} died")
                raise RouterError(ErrorKind.INTERNAL, result.error or "the prefill failed", "prefill_failed")
            phases["queue_s"] += result.queue_s
            flight.cached_tokens = result.cached_tokens
            phases["prefill_s"] = result.prefill_s
            phases["transfer_s"] = result.transfer_s
            if result.encode_s:
                phases["encode_s"] = result.encode_s
            flight.state = FlightState.ACTIVATING
            out = await self._activate(request, flight, decode, ids, result.first_token, deadline)
            if result.first_logprob is not None:  # the first token was sampled on the prefill worker
                out = dataclasses.replace(out, logprobs=(result.first_logprob,))
            return out

    async def _activate(self, request, flight, decode: WorkerHandle, ids, first_token: int, deadline) -> StepOutput:
        try:
            return await self.bounded(
                decode.actor.activate.remote(
                    flight.request_id,
                    ids,
                    first_token,
                    request.sampling,
                    epoch=decode.epoch,
                    **({"resume": flight.resume} if flight.resume else {}),
                    cache_salt=request.cache_salt,
                    # a prompt with images: its blocks are keyed by their content hashes too
                    **({"image_hashes": flight.image_hashes} if flight.image_hashes else {}),
                ),
                deadline,
                "decode activation",
            )
        except RouterError:
            raise
        except Exception as exc:
            if is_actor_death(exc):
                self.worker_died(decode, exc)
                raise DecodeDied(f"decode worker {decode.worker_id} died") from None
            if is_stale(exc):
                raise RouterError(ErrorKind.UNAVAILABLE, f"decode worker {decode.worker_id} changed role") from None
            log.error("decode activation of %s on %s failed: %r", flight.request_id, decode.worker_id, exc)
            raise RouterError(
                ErrorKind.INTERNAL, "the decode worker could not start this request", "activation_failed"
            ) from None

    async def _encode(self, flight: Flight, prefill: WorkerHandle, deadline: float, phases) -> tuple[EncodeShard, ...]:
        """Have the encode workers send the request's image features to `prefill`; its shards.

        Only a dead *prefill* worker propagates as an actor death (the caller retries prefill
        elsewhere); encode failures become RouterErrors and the prepared receives are closed."""
        workers = [w for w in self.pools.encode if w.serving]
        if not workers:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live encode worker")
        flight.state = FlightState.ENCODING
        images = list(flight.images)
        plan = plan_shards(flight.request_id, images, len(workers))
        shards = [s for _, s in plan]
        descs = await self.bounded(
            prefill.actor.prepare_images.remote(shards, epoch=prefill.epoch), deadline, "image receive setup"
        )
        t = time.monotonic()
        leases = [Lease(workers[w]) for w, _ in plan]  # the policy's encode queue; a draining worker waits for 0
        try:
            await self.bounded(
                encode_parallel([w.actor for w in workers], plan, images, descs, epochs=[w.epoch for w in workers]),
                deadline,
                "image encoding",
            )
        except BaseException as exc:
            try:
                await asyncio.wait_for(prefill.actor.release_images.remote(shards), CANCEL_TIMEOUT_S)
            except Exception as rel:
                log.warning("releasing image receives of %s failed: %s", flight.request_id, rel)
            if not isinstance(exc, Exception) or isinstance(exc, RouterError):
                raise
            if is_actor_death(exc):
                await self._reap_encode([workers[w] for w, _ in plan])
                log.error("an encode worker died encoding %s: %r", flight.request_id, exc)
                raise RouterError(
                    ErrorKind.UNAVAILABLE, "an encode worker died while encoding this request's images", "worker_died"
                ) from None
            if is_stale(exc):  # switched role between the pick and the call
                raise RouterError(
                    ErrorKind.UNAVAILABLE, "an encode worker changed role; retry", "worker_switched"
                ) from None
            log.error("image encoding of %s failed: %r", flight.request_id, exc)
            raise RouterError(ErrorKind.INTERNAL, "image encoding failed", "encode_failed") from None
        finally:
            for lease in leases:
                lease.release()
        phases["encode_s"] = time.monotonic() - t
        return tuple(shards)

    async def _reap_encode(self, workers: list[WorkerHandle]) -> None:
        """Mark dead the encode workers that Ray says are dead (an encode call failed with a death)."""
        pings = await asyncio.gather(
            *(asyncio.wait_for(w.actor.ready.remote(), 5.0) for w in workers), return_exceptions=True
        )
        for w, ping in zip(workers, pings):
            if isinstance(ping, BaseException) and is_actor_death(ping):
                w.alive = False
                log.error("encode worker %s died: %s", w.worker_id, ping)
