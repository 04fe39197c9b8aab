"""The gateway's servicer: one router behind two serving doors, gRPC (`triptych.v1.Triptych`,
this class) and OpenAI HTTP (cluster/http_api.py), plus the admin service (cluster/admin.py).

    client ──gRPC──▶ Gateway (servicer) ─┐  authenticate ─▶ parse + cheap caps (cluster/limits.py,
                                         │                   cluster/gateway_proto.py)
    client ──HTTP──▶ http_api handlers ──┴─▶ Gateway.events() ─▶ admission thread: history trim,
                                             tokenize, decode images (router.prepare)
                                             ─▶ Router.generate() ─▶ events

`Gateway.events` is the request path both doors share. Its promise to a door: it raises
RouterError before the first event (bad input, overload, a failure before any token: the door
turns that into a status) and otherwise yields TokenEvents then exactly one FinalEvent, even when
the router misbehaves (an exception after the first event, or a stream without a final event,
become FinalEvent(ERROR)). Leaving it early (client cancelled, disconnected, deadline passed)
closes the router's iterator, which aborts the request.

Ownership: every request belongs to the principal (API key) that sent it (cluster/auth.py). The
client's request id is its own name for it, unique among that principal's requests in flight;
the router sees a fresh internal id, so ids never collide across clients, `Abort` finds only the
caller's own requests (another's and an unknown id answer the same), and sessions are the
principal's (cluster/sessions.py). Each principal has at most `max_requests_per_client` requests
in flight and a bounded number being prepared at once (cluster/client_share.py), so one client cannot fill the
queue or the admission threads for the others.

The event loop only moves bytes: tokenizing, chat templates, history trimming and image
decoding run on admission threads, after the caps of cluster/limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
import grpc.aio

from cluster import limits as caps
from cluster.auth import ANONYMOUS, KeyRing, Principal
from cluster.client_share import ClientShares
from cluster.config import LimitsConfig
from cluster.gateway_proto import (
    GRPC_CODES,
    SERVICE_NAME,
    event_to_pb,
    input_from_pb,
    invalid,
    parse_request,
    status_to_pb,
)
from cluster.metrics import Metrics
from cluster.router_api import (
    ChatMessage,
    ClusterStatus,
    ErrorKind,
    FinalEvent,
    GenerateInput,
    Prepared,
    Router,
    RouterError,
    TokenEvent,
)
from cluster.sessions import SessionStore, trim_to_fit
from engine.sequence import FinishReason
from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STATUS_TTL_S = 1.0
REFUSAL_LOG_S = 10.0  # one log line per refusal reason at most this often (a flood must not flood the log)
UNAUTHENTICATED_MESSAGE = "missing or unknown API key (send 'authorization: Bearer <key>')"


def bearer(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata of a gRPC call."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


@dataclass
class _Owned:
    """One request in flight, as its owner knows it."""

    principal: Principal
    client_id: str
    internal_id: str
    aborted: bool = False  # Abort came while it was being prepared (before the router knew it)


class Gateway(pb_grpc.TriptychServicer):
    """Serves the Triptych gRPC service and the shared request path (`events`) on one router."""

    def __init__(
        self,
        router: Router,
        *,
        sessions: SessionStore | None = None,
        metrics: Metrics | None = None,
        keys: KeyRing | None = None,
        limits: LimitsConfig = LimitsConfig(),
        max_queued_requests: int = 256,
    ) -> None:
        self.router = router
        self.sessions = sessions if sessions is not None else SessionStore()
        self.metrics = metrics if metrics is not None else Metrics(router.model_info().name)
        self.keys = keys if keys is not None else KeyRing()
        self.limits = limits
        self.shares = ClientShares(limits, max_queued_requests)
        self.serving = False  # set by start(); cleared when stopping
        self._owned: dict[tuple[Principal, str], _Owned] = {}
        self._status: tuple[float, ClusterStatus] | None = None
        self._status_task: asyncio.Future | None = None
        self._refusals_logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged, not logged since)
        self.metrics.in_flight.set_function(lambda: len(self._owned))

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    @property
    def in_flight(self) -> frozenset[str]:
        """Client request ids in flight (of every principal)."""
        return frozenset(client_id for _, client_id in self._owned)

    def refuse(self, err: RouterError, door: str) -> RouterError:
        """Count a refusal (triptych_request_errors_total{kind, door, reason}) once and log it
        (at most one line per reason every REFUSAL_LOG_S, with how many were not logged); hand
        it back."""
        if not err.counted:
            self.metrics.record_rejected(err.kind.value, door, err.reason)
            err.counted = True
            now = time.monotonic()
            last, quiet = self._refusals_logged.get(err.reason, (-REFUSAL_LOG_S, 0))
            if now - last >= REFUSAL_LOG_S:
                more = f" ({quiet} more since the last line)" if quiet else ""
                log.info("refused a %s request (%s, %s): %s%s", door, err.kind.value, err.reason, err.message, more)
                self._refusals_logged[err.reason] = (now, 0)
            else:
                self._refusals_logged[err.reason] = (last, quiet + 1)
        return err

    async def off_loop(self, principal: Principal, fn, *args):
        """Run `fn(*args)` (parsing, tokenizing, decoding) on an admission thread: the event loop
        only moves bytes (cluster/client_share.py: at most a share of the threads per client)."""
        return await self.shares.off_loop(principal, fn, *args)

    def close(self) -> None:
        self.shares.close()

    async def cluster_status(self) -> ClusterStatus:
        """The router's cluster status, at most STATUS_TTL_S old, one refresh at a time: asking
        every worker for its status costs each of them a turn of its step thread, so a client
        calling GetClusterStatus or /metrics in a loop must not multiply that."""
        now = time.monotonic()
        if self._status is not None and now - self._status[0] < STATUS_TTL_S:
            return self._status[1]
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.ensure_future(self.router.cluster_status())
        task = self._status_task
        status = await asyncio.shield(task)
        if task is self._status_task:  # not forgotten meanwhile
            self._status = (time.monotonic(), status)
        return status

    def forget_status(self) -> None:
        """The cluster changed (a role switch through the admin service): the next status call
        asks the workers again, so a client reads its own change."""
        self._status = self._status_task = None

    def enter(self, principal: Principal, door: str) -> contextlib.AbstractContextManager:
        """Count a request against its client from the moment its door takes it (before its body
        is read or parsed) until it ends; refused (RESOURCE_EXHAUSTED, counted) past the client's
        limit or share (cluster/client_share.py)."""
        try:
            return self.shares.enter(principal)
        except RouterError as err:
            raise self.refuse(err, door) from None

    # -- the shared request path ----------------------------------------------------------

    async def events(
        self, inp: GenerateInput, *, principal: Principal = ANONYMOUS, session_id: str | None = None, door: str = "grpc"
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Stream one request; see the module docstring for what this promises. `inp.request_id`
        is the client's id for it (unique among `principal`'s requests in flight)."""
        key = (principal, inp.request_id)
        try:
            if not self.serving:
                raise RouterError(
                    ErrorKind.UNAVAILABLE, "the server is not serving (starting or shutting down)", "not_serving"
                )
            caps.check_input(inp, self.limits, self.router.model_info().max_model_len)
            if session_id:
                caps.check_id("session_id", session_id, self.limits)
                if inp.messages is None:
                    raise invalid("session_id needs chat input (messages)")
            if key in self._owned:
                raise invalid(f"request_id {caps.clip(inp.request_id)} is already in flight", "duplicate_request_id")
        except RouterError as err:
            raise self.refuse(err, door) from None
        owned = _Owned(principal, inp.request_id, self.new_request_id())
        self._owned[key] = owned
        recorder = None
        stream = None
        final: FinalEvent | None = None
        texts: list[str] = []
        ntokens = 0
        try:
            try:
                routed, prepared = await self._prepare(
                    principal, replace(inp, request_id=owned.internal_id, tenant=principal.name), session_id
                )
                stream = self.router.generate(routed, prepared)
                if owned.aborted:
                    await self.router.abort(owned.internal_id)
            except RouterError as err:
                raise self.refuse(err, door) from None
            except Exception:
                log.exception(
                    "admission of request %s (client %s, id %s) failed",
                    owned.internal_id,
                    principal,
                    caps.clip(inp.request_id),
                )
                raise self.refuse(RouterError(ErrorKind.INTERNAL, "internal error", "internal"), door) from None
            recorder = self.metrics.start(door)
            while final is None:
                try:
                    event = await anext(stream)
                except StopAsyncIteration:
                    final = _failed(ntokens, texts, "the router ended the stream without a final event")
                except RouterError as err:
                    if ntokens == 0 and not texts:  # refused before any token: a status, with its reason
                        recorder = None
                        raise self.refuse(err, door) from None
                    final = _failed(ntokens, texts, err.message, err.kind)
                except Exception:  # a router bug: never leave the client hanging
                    log.exception("router failed on request %s", owned.internal_id)
                    final = _failed(ntokens, texts, "internal error")
                else:
                    if isinstance(event, FinalEvent):
                        final = event
                    else:
                        ntokens += len(event.token_ids)
                        texts.append(event.text)
                        recorder.on_tokens(len(event.token_ids))
                        yield event
            if final.finish_reason is FinishReason.ERROR and ntokens == 0 and not texts:
                # Nothing reached the client yet: the door answers with a status, not a chunk.
                err = RouterError(final.error_kind or ErrorKind.INTERNAL, final.error or "the request failed", "failed")
                recorder = None
                raise self.refuse(err, door)
            if not final.text and texts:  # FinalEvent.text is the whole completion
                final = replace(final, text="".join(texts))
            recorder.finish(final)
            recorder = None
            if session_id and final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                self.sessions.append_turn(principal, session_id, inp.messages, final.text)
            yield final
        finally:
            del self._owned[key]
            if recorder is not None:  # left early: the client went away
                recorder.finish(FinalEvent(FinishReason.ABORT, 0, ntokens, "".join(texts)))
            if stream is not None:
                await _close(stream)

    async def _prepare(
        self, principal: Principal, inp: GenerateInput, session_id: str | None
    ) -> tuple[GenerateInput, Prepared | None]:
        """The request with its session's history, and the router's prepare() of it, computed on
        an admission thread (a bounded number of one principal's at once)."""
        history = self.sessions.history(principal, session_id) if session_id else ()
        routed, kept, prepared = await self.off_loop(principal, self._prepare_sync, inp, history)
        if session_id and len(kept) != len(history):
            self.sessions.replace(principal, session_id, kept, was=history)
        return routed, prepared

    def _prepare_sync(self, inp: GenerateInput, history: tuple[ChatMessage, ...]):
        """(input with history, the history kept, router.prepare(input)); runs on a thread."""
        kept = history
        if history:
            max_len = self.router.model_info().max_model_len
            # Old turns are dropped (oldest first) so that the prompt leaves room for the reply.
            budget = max_len - min(inp.sampling.max_tokens, max_len // 2)
            try:
                kept = trim_to_fit(history, inp.messages, self.router.count_tokens, budget, self.router.estimate_tokens)
            except Exception:  # the history cannot be templated with the new turn: start afresh
                log.warning(
                    "request %s: its session history could not be trimmed; sending it without history",
                    inp.request_id,
                    exc_info=True,
                )
                kept = ()
            inp = replace(inp, messages=(*kept, *inp.messages))
        return inp, kept, self.router.prepare(inp)

    async def abort(self, request_id: str, principal: Principal = ANONYMOUS) -> bool:
        """Abort one of `principal`'s requests; False for an unknown id and for another's alike."""
        owned = self._owned.get((principal, request_id))
        if owned is None:
            return False
        owned.aborted = True  # still being prepared: aborted as soon as the router has it
        await self.router.abort(owned.internal_id)
        return True

    # -- gRPC ---------------------------------------------------------------------------------

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        who = self.keys.serving(bearer(context))
        if who is None:
            self.refuse(RouterError(ErrorKind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, "unauthenticated"), "grpc")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return who

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext):
        """`raw`: the serialized GenerateRequest (see add_to_server): it is parsed on an admission
        thread after the caller is authenticated, since parsing a message near the size limit
        (a million chat messages) takes a noticeable time."""
        principal = await self._principal(context)
        try:
            entered = self.enter(principal, "grpc")
        except RouterError as err:
            await context.abort(GRPC_CODES[err.kind], err.message)
        with entered:
            try:
                rid, inp, session_id = await self.off_loop(
                    principal, self._parse_generate, raw, context.time_remaining()
                )
            except RouterError as err:
                self.refuse(err, "grpc")
                await context.abort(GRPC_CODES[err.kind], err.message)
            async for response in self._generate(rid, inp, principal, session_id, context):
                yield response

    def _parse_generate(self, raw: bytes, deadline_s: float | None) -> tuple[str, GenerateInput, str | None]:
        """(response request id, router input, session id) of a serialized request; on a thread."""
        info = self.router.model_info()
        request = parse_request(raw, self.limits, info.supports_images)
        if request.request_id:
            caps.check_id("request_id", request.request_id, self.limits)
        rid = request.request_id or self.new_request_id()
        return rid, input_from_pb(request, rid, info.max_model_len, deadline_s, self.limits), request.session_id or None

    async def _generate(
        self,
        rid: str,
        inp: GenerateInput,
        principal: Principal,
        session_id: str | None,
        context: grpc.aio.ServicerContext,
    ):
        events = self.events(inp, principal=principal, session_id=session_id, door="grpc")
        try:
            try:
                first = await anext(events)
            except RouterError as err:
                await context.abort(GRPC_CODES[err.kind], err.message)
            event, index = first, 0  # index: position of the event's first token in the completion
            while True:
                yield event_to_pb(rid, event, index)
                if isinstance(event, FinalEvent):
                    break
                index += len(event.token_ids)
                event = await anext(events)
        finally:
            await events.aclose()  # on cancellation this closes the router's stream: abort

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        principal = await self._principal(context)
        return pb.AbortResponse(aborted=await self.abort(request.request_id, principal))

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        await self._principal(context)
        info = self.router.model_info()
        return pb.GetModelInfoResponse(
            model=info.name,
            max_model_len=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            dtype=info.dtype,
            supports_images=info.supports_images,
        )

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        await self._principal(context)
        return await answer_status(self, context)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register `triptych.v1.Triptych` on `server`, as the generated
        add_TriptychServicer_to_server does, except that Generate receives its request unparsed."""
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString
            ),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.Abort,
                request_deserializer=pb.AbortRequest.FromString,
                response_serializer=pb.AbortResponse.SerializeToString,
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo,
                request_deserializer=pb.GetModelInfoRequest.FromString,
                response_serializer=pb.GetModelInfoResponse.SerializeToString,
            ),
            "GetClusterStatus": grpc.unary_unary_rpc_method_handler(
                self.GetClusterStatus,
                request_deserializer=pb.GetClusterStatusRequest.FromString,
                response_serializer=pb.GetClusterStatusResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def answer_status(gateway: Gateway, context: grpc.aio.ServicerContext) -> pb.GetClusterStatusResponse:
    """GetClusterStatus of the serving and the admin service alike (once the caller is let in)."""
    try:
        return status_to_pb(await gateway.cluster_status())
    except RouterError as err:
        await context.abort(GRPC_CODES[err.kind], err.message)


def _failed(ntokens: int, texts: list[str], message: str, kind: ErrorKind = ErrorKind.INTERNAL) -> FinalEvent:
    """FinalEvent(ERROR) of a stream that already sent `ntokens` tokens (their text: `texts`)."""
    return FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts), error=message, error_kind=kind)


async def _close(stream: AsyncIterator) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # closing must never mask how the request ended
        log.exception("closing a router stream failed")
