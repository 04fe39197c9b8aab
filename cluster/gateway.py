"""The gateway: one router behind two serving doors, gRPC (`triptych.v1.Triptych`) and OpenAI
HTTP, plus the admin service on its own port (cluster/admin.py).

    client ──gRPC──▶ Gateway (servicer) ─┐  authenticate ─▶ parse + cheap caps (cluster/limits.py)
                                         ├─▶ Gateway.events() ─▶ admission thread: history trim,
    client ──HTTP──▶ http_api handlers ──┘   tokenize, decode images (router.prepare)
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
in flight and at most ADMISSIONS_PER_CLIENT being prepared at once, so one client cannot fill the
queue or the admission threads for the others.

The event loop only moves bytes: tokenizing, chat templates, history trimming and image
decoding run on ADMISSION_THREADS threads, after the caps of cluster/limits.py.

`start(router, server_config)` binds the doors (port 0: a free port) and returns a
RunningGateway with the bound ports; `RunningGateway.stop()` stops serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_health.v1 import health_pb2_grpc
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection

from cluster import limits as caps
from cluster.auth import ANONYMOUS, KeyRing, Principal
from cluster.config import LimitsConfig, ServerConfig
from cluster.metrics import Metrics
from cluster.router_api import ChatMessage, ClusterStatus, ErrorKind, FinalEvent, GenerateInput, Prepared, Router, RouterError, TokenEvent
from engine.worker_api import Role
from cluster.sessions import SessionStore, trim_to_fit
from engine.sequence import FinishReason
from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Triptych"].full_name
CHAT_ROLES = ("system", "user", "assistant")
ADMISSION_THREADS = 4
ADMISSIONS_PER_CLIENT = 2
STATUS_TTL_S = 1.0

GRPC_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
}
_FINISH_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
ROLE_PB = {Role.ENCODE: pb.ROLE_ENCODE, Role.PREFILL: pb.ROLE_PREFILL, Role.DECODE: pb.ROLE_DECODE,
           Role.COLOCATED: pb.ROLE_COLOCATED}  # fmt: skip
_MODE_PB = {"colocated": pb.MODE_COLOCATED, "disaggregated": pb.MODE_DISAGGREGATED}
UNAUTHENTICATED_MESSAGE = "missing or unknown API key (send 'authorization: Bearer <key>')"


def _shape_classes():
    """Wire-compatible views of GenerateRequest and ChatMessages whose chat messages and images are
    left as bytes: parsing through them counts a request's messages and images without building
    them (a million chat messages take ~100 ms to parse fully, holding the interpreter lock; ~15
    ms this way), so an oversized request is refused before the full parse."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="triptych_gateway_shape.proto", package="triptych_gateway")
    chat = proto.message_type.add(name="ChatShape")
    chat.field.add(name="messages", number=1, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    message = proto.message_type.add(name="MessageShape")
    message.field.add(name="content", number=2, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    request = proto.message_type.add(name="RequestShape")
    request.field.add(name="chat", number=3, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    request.field.add(name="images", number=5, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"triptych_gateway.{name}"))  # noqa: E731
    return get("RequestShape"), get("ChatShape"), get("MessageShape")


_RequestShape, _ChatShape, _MessageShape = _shape_classes()


def parse_request(raw: bytes, limits: LimitsConfig, supports_images: bool = True) -> pb.GenerateRequest:
    """Parse a serialized GenerateRequest, checking its size and counting its messages and images
    first (see _shape_classes). Raises RouterError(INVALID_ARGUMENT) for too many or for bytes
    that are not a GenerateRequest."""
    caps.check_size(len(raw), limits, supports_images)
    try:
        shape = _RequestShape.FromString(raw)
        messages = _ChatShape.FromString(shape.chat).messages if shape.chat else ()
        caps.check_count("messages", len(messages), limits.max_messages, "max_messages", "too_many_messages")
        parts = sum(len(_MessageShape.FromString(m).content) for m in messages)
    except DecodeError:
        raise invalid("the request is not a valid GenerateRequest message") from None
    caps.check_count("content parts", parts, caps.max_content_parts(limits), "4 x max_messages + max_images",
                     "too_many_parts")
    caps.check_count("images", len(shape.images), limits.max_images, "max_images", "too_many_images")
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError:
        raise invalid("the request is not a valid GenerateRequest message") from None


def invalid(message: str, reason: str = "bad_request") -> RouterError:
    return RouterError(ErrorKind.INVALID_ARGUMENT, message, reason)


def bearer(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata of a gRPC call."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Proto <-> router types


def input_from_pb(req: pb.GenerateRequest, request_id: str, max_model_len: int, deadline_s: float | None,
                  limits: LimitsConfig = LimitsConfig()) -> GenerateInput:  # fmt: skip
    kind = req.WhichOneof("input")
    if kind is None:
        raise invalid("no input: set one of prompt, chat, token_ids")
    if req.session_id and kind != "chat":
        raise invalid(f"session_id needs chat input, got {kind}")
    s = req.sampling
    caps.check_count("stop strings", len(s.stop), limits.max_stop_strings, "max_stop_strings", "too_many_stop_strings")
    sampling = caps.sampling(
        max_tokens=s.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), ignore_eos=s.ignore_eos, max_model_len=max_model_len, limits=limits,
    )  # fmt: skip
    caps.check_count("images", len(req.images), limits.max_images, "max_images", "too_many_images")
    for i, image in enumerate(req.images):
        if not image.data:
            raise invalid(f"images[{i}].data is empty")
    images = tuple(image.data for image in req.images)
    common = dict(request_id=request_id, sampling=sampling, deadline_s=deadline_s)
    if kind == "prompt":
        return GenerateInput(prompt=req.prompt, images=images, **common)
    if kind == "token_ids":
        if not req.token_ids.ids:
            raise invalid("token_ids is empty")
        caps.check_prompt_tokens(len(req.token_ids.ids), max_model_len)   # before a million become a tuple
        return GenerateInput(token_ids=tuple(req.token_ids.ids), images=images, **common)
    if images:
        raise invalid("chat input carries its images inside its messages; GenerateRequest.images must be empty")
    if not req.chat.messages:
        raise invalid("chat input has no messages")
    caps.check_count("messages", len(req.chat.messages), limits.max_messages, "max_messages", "too_many_messages")
    return GenerateInput(messages=tuple(_message_from_pb(i, m) for i, m in enumerate(req.chat.messages)), **common)


def _message_from_pb(i: int, msg: pb.ChatMessage) -> ChatMessage:
    if msg.role not in CHAT_ROLES:
        raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {caps.clip(msg.role)}")
    texts: list[str] = []
    images: list[bytes] = []
    for j, part in enumerate(msg.content):
        which = part.WhichOneof("part")
        if which == "text":
            texts.append(part.text)
        elif which == "image":
            if not part.image.data:
                raise invalid(f"messages[{i}].content[{j}].image.data is empty")
            images.append(part.image.data)
        else:
            raise invalid(f"messages[{i}].content[{j}] is empty: set text or image")
    return ChatMessage(role=msg.role, content="".join(texts), images=tuple(images))


def final_to_pb(request_id: str, final: FinalEvent) -> pb.GenerateResponse:
    t = final.timings
    return pb.GenerateResponse(
        request_id=request_id,
        final=pb.FinalChunk(
            finish_reason=_FINISH_PB[final.finish_reason],
            usage=pb.Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
            timings=pb.Timings(queue_s=t.queue_s, encode_s=t.encode_s, prefill_s=t.prefill_s,
                               transfer_s=t.transfer_s, decode_s=t.decode_s, ttft_s=t.ttft_s,
                               tpot_s=t.tpot_s, e2e_s=t.e2e_s),  # fmt: skip
            error=(final.error or "unknown error") if final.finish_reason is FinishReason.ERROR else "",
        ),
    )


# ---------------------------------------------------------------------------------------------
# The gateway


@dataclass
class _Owned:
    """One request in flight, as its owner knows it."""

    principal: Principal
    client_id: str
    internal_id: str
    aborted: bool = False           # Abort came while it was being prepared (before the router knew it)


class _Entered:
    """A request counted against its client (Gateway.enter); leaving the block uncounts it."""

    def __init__(self, counts: collections.Counter, principal: Principal) -> None:
        self._counts, self._principal = counts, principal

    def __enter__(self) -> _Entered:
        return self

    def __exit__(self, *exc: object) -> None:
        self._counts[self._principal] -= 1
        if self._counts[self._principal] <= 0:
            del self._counts[self._principal]


@dataclass
class _Slot:
    """A principal's share of the admission threads, while it has requests being prepared."""

    semaphore: asyncio.Semaphore
    users: int = 0


class Gateway(pb_grpc.TriptychServicer):
    """Serves the Triptych gRPC service and the shared request path (`events`) on one router."""

    def __init__(self, router: Router, *, sessions: SessionStore | None = None, metrics: Metrics | None = None,
                 keys: KeyRing | None = None, limits: LimitsConfig = LimitsConfig(),
                 max_queued_requests: int = 256) -> None:  # fmt: skip
        self.router = router
        self.sessions = sessions if sessions is not None else SessionStore()
        self.metrics = metrics if metrics is not None else Metrics()
        self.keys = keys if keys is not None else KeyRing()
        self.limits = limits
        self.max_queued = max_queued_requests   # in flight in the whole server (see enter())
        self.serving = False  # set by start(); cleared when stopping
        self._owned: dict[tuple[Principal, str], _Owned] = {}
        self._per_client: collections.Counter[Principal] = collections.Counter()
        self._admission = ThreadPoolExecutor(ADMISSION_THREADS, thread_name_prefix="admission")
        self._admitting: dict[Principal, _Slot] = {}
        self._status: tuple[float, ClusterStatus] | None = None
        self._status_task: asyncio.Future | None = None

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    @property
    def in_flight(self) -> frozenset[str]:
        """Client request ids in flight (of every principal)."""
        return frozenset(client_id for _, client_id in self._owned)

    def refuse(self, err: RouterError, door: str) -> RouterError:
        """Count a refusal (triptych_request_errors_total{kind, door, reason}) once; hand it back."""
        if not err.counted:
            self.metrics.record_rejected(err.kind.value, door, err.reason)
            err.counted = True
        return err

    async def off_loop(self, principal: Principal, fn, *args):
        """Run `fn(*args)` (parsing, tokenizing, decoding) on an admission thread: the event loop
        only moves bytes. At most ADMISSIONS_PER_CLIENT of one principal's run at once."""
        slot = self._admitting.get(principal)
        if slot is None:
            slot = self._admitting[principal] = _Slot(asyncio.Semaphore(ADMISSIONS_PER_CLIENT))
        slot.users += 1

        def leave(_=None) -> None:
            slot.users -= 1
            if slot.users == 0:              # nobody holds or waits for it: forget it
                del self._admitting[principal]

        try:
            await slot.semaphore.acquire()
        except BaseException:
            leave()
            raise

        def done(_) -> None:
            slot.semaphore.release()
            leave()

        # A job on a thread cannot be stopped: if the caller goes away (a client that sends heavy
        # requests and disconnects), the place is given back only when the job ends, so one client
        # never has more than its share of the threads busy.
        job = asyncio.get_running_loop().run_in_executor(self._admission, fn, *args)
        job.add_done_callback(done)
        return await asyncio.shield(job)

    def close(self) -> None:
        self._admission.shutdown(wait=False, cancel_futures=True)

    async def cluster_status(self) -> ClusterStatus:
        """The router's cluster status, at most STATUS_TTL_S old, one refresh at a time: asking
        every worker for its status costs each of them a turn of its step thread, so a client
        calling GetClusterStatus or /metrics in a loop must not multiply that."""
        now = time.monotonic()
        if self._status is not None and now - self._status[0] < STATUS_TTL_S:
            return self._status[1]
        if self._status_task is None or self._status_task.done():
            self._status_task = asyncio.ensure_future(self.router.cluster_status())
        status = await asyncio.shield(self._status_task)
        self._status = (time.monotonic(), status)
        return status

    def enter(self, principal: Principal, door: str) -> contextlib.AbstractContextManager:
        """Count a request against its client from the moment its door takes it (before its body
        is read or parsed) until it ends. Refused (RESOURCE_EXHAUSTED, counted) when the client has
        `max_requests_per_client`, or when the server has `max_queued_requests` and this client
        already holds its share of them (max_queued_requests / clients with requests): a client
        below its share is still admitted, so a few heavy clients cannot lock the others out."""
        held, limit = self._per_client[principal], self.limits.max_requests_per_client
        if held >= limit:
            raise self.refuse(RouterError(
                ErrorKind.RESOURCE_EXHAUSTED, f"this client has {held} requests in flight (limit "
                f"server.limits.max_requests_per_client = {limit}); retry later", "client_busy"), door)
        total, clients = sum(self._per_client.values()), len(self._per_client) + (held == 0)
        if total >= self.max_queued and held >= max(1, self.max_queued // clients):
            raise self.refuse(RouterError(
                ErrorKind.RESOURCE_EXHAUSTED, f"the server has {total} requests in flight (limit "
                f"server.max_queued_requests = {self.max_queued}) and this client holds its share of them; retry later",
                "server_busy"), door)
        self._per_client[principal] += 1     # checked and counted now; the caller enters at once
        return _Entered(self._per_client, principal)

    # -- the shared request path ----------------------------------------------------------

    async def events(self, inp: GenerateInput, *, principal: Principal = ANONYMOUS, session_id: str | None = None,
                     door: str = "grpc") -> AsyncIterator[TokenEvent | FinalEvent]:  # fmt: skip
        """Stream one request; see the module docstring for what this promises. `inp.request_id`
        is the client's id for it (unique among `principal`'s requests in flight)."""
        key = (principal, inp.request_id)
        try:
            if not self.serving:
                raise RouterError(ErrorKind.UNAVAILABLE, "the server is not serving (starting or shutting down)",
                                  "not_serving")
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
                    principal, replace(inp, request_id=owned.internal_id, tenant=principal.name), session_id)
                stream = self.router.generate(routed, prepared)
                if owned.aborted:
                    await self.router.abort(owned.internal_id)
            except RouterError as err:
                raise self.refuse(err, door) from None
            except Exception:
                log.exception("admission of request %s (client %s, id %s) failed", owned.internal_id, principal,
                              caps.clip(inp.request_id))
                raise self.refuse(RouterError(ErrorKind.INTERNAL, "internal error", "internal"), door) from None
            recorder = self.metrics.start(door)
            while final is None:
                try:
                    event = await anext(stream)
                except StopAsyncIteration:
                    final = FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts),
                                       error="the router ended the stream without a final event",
                                       error_kind=ErrorKind.INTERNAL)  # fmt: skip
                except RouterError as err:
                    if ntokens == 0 and not texts:   # refused before any token: a status, with its reason
                        recorder = None
                        raise self.refuse(err, door) from None
                    final = FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts), error=err.message,
                                       error_kind=err.kind)
                except Exception:  # a router bug: never leave the client hanging
                    log.exception("router failed on request %s", owned.internal_id)
                    final = FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts), error="internal error",
                                       error_kind=ErrorKind.INTERNAL)
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
                err = RouterError(final.error_kind or ErrorKind.INTERNAL, final.error or "the request failed",
                                  "failed")
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

    async def _prepare(self, principal: Principal, inp: GenerateInput,
                       session_id: str | None) -> tuple[GenerateInput, Prepared | None]:  # fmt: skip
        """The request with its session's history, and the router's prepare() of it, computed on
        an admission thread (at most ADMISSIONS_PER_CLIENT of one principal's at once)."""
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
            except Exception:    # the history cannot be templated with the new turn: start afresh
                log.warning("request %s: its session history could not be trimmed; sending it without history",
                            inp.request_id, exc_info=True)
                kept = ()
            inp = replace(inp, messages=(*kept, *inp.messages))
        return inp, kept, self.router.prepare(inp)

    async def abort(self, request_id: str, principal: Principal = ANONYMOUS) -> bool:
        """Abort one of `principal`'s requests; False for an unknown id and for another's alike."""
        owned = self._owned.get((principal, request_id))
        if owned is None:
            return False
        owned.aborted = True            # still being prepared: aborted as soon as the router has it
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
                rid, inp, session_id = await self.off_loop(principal, self._parse_generate, raw,
                                                           context.time_remaining())
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

    async def _generate(self, rid: str, inp: GenerateInput, principal: Principal, session_id: str | None,
                        context: grpc.aio.ServicerContext):  # fmt: skip
        events = self.events(inp, principal=principal, session_id=session_id, door="grpc")
        try:
            try:
                first = await anext(events)
            except RouterError as err:
                await context.abort(GRPC_CODES[err.kind], err.message)
            event, index = first, 0  # index: position of the event's first token in the completion
            while True:
                yield _event_to_pb(rid, event, index)
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
        return pb.GetModelInfoResponse(model=info.name, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                                       eos_token_ids=list(info.eos_token_ids), dtype=info.dtype,
                                       supports_images=info.supports_images)  # fmt: skip

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        await self._principal(context)
        return await answer_status(self, context)


    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register `triptych.v1.Triptych` on `server`, as the generated
        add_TriptychServicer_to_server does, except that Generate receives its request unparsed."""
        handlers = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=None, response_serializer=pb.GenerateResponse.SerializeToString),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.Abort, request_deserializer=pb.AbortRequest.FromString,
                response_serializer=pb.AbortResponse.SerializeToString),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
                response_serializer=pb.GetModelInfoResponse.SerializeToString),
            "GetClusterStatus": grpc.unary_unary_rpc_method_handler(
                self.GetClusterStatus, request_deserializer=pb.GetClusterStatusRequest.FromString,
                response_serializer=pb.GetClusterStatusResponse.SerializeToString),
        }  # fmt: skip
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def answer_status(gateway: Gateway, context: grpc.aio.ServicerContext) -> pb.GetClusterStatusResponse:
    """GetClusterStatus of the serving and the admin service alike (once the caller is let in)."""
    try:
        return status_to_pb(await gateway.cluster_status())
    except RouterError as err:
        await context.abort(GRPC_CODES[err.kind], err.message)


def status_to_pb(status) -> pb.GetClusterStatusResponse:
    pools = []
    for role in Role:
        workers = [w for w in status.workers if w.role is role]
        if workers:
            pools.append(pb.PoolStatus(role=ROLE_PB[role], workers=[
                pb.WorkerStatus(worker_id=w.worker_id, role=ROLE_PB[w.role], node_id=w.node_id, alive=w.alive,
                                queue_length=w.queue_length, running=w.running, kv_blocks_used=w.kv_blocks_used,
                                kv_blocks_total=w.kv_blocks_total, epoch=w.epoch)
                for w in workers]))  # fmt: skip
    return pb.GetClusterStatusResponse(mode=_MODE_PB.get(status.mode, pb.MODE_UNSPECIFIED), pools=pools,
                                       role_switches=[switch_to_pb(s) for s in status.role_switches],
                                       role_switch_count=max(status.switch_count, len(status.role_switches)),
                                       restarts=[pb.WorkerRestarts(worker_id=w, restarts=n) for w, n in status.restarts])


def switch_to_pb(s) -> pb.RoleSwitch:
    return pb.RoleSwitch(worker_id=s.worker_id, from_role=ROLE_PB[s.from_role], to_role=ROLE_PB[s.to_role],
                         at_unix_s=s.at_unix_s, reason=s.reason, epoch=s.epoch, drain_s=s.drain_s, switch_s=s.switch_s)


def _event_to_pb(rid: str, event: TokenEvent | FinalEvent, index: int) -> pb.GenerateResponse:
    if isinstance(event, FinalEvent):
        return final_to_pb(rid, event)
    chunk = pb.TokenChunk(text=event.text, token_ids=list(event.token_ids), index=index)
    return pb.GenerateResponse(request_id=rid, chunk=chunk)


async def _close(stream: AsyncIterator) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # closing must never mask how the request ended
        log.exception("closing a router stream failed")


# ---------------------------------------------------------------------------------------------
# Startup


class BindError(RuntimeError):
    """A port could not be bound; the message names the address."""


@dataclass
class RunningGateway:
    gateway: Gateway
    host: str
    grpc_port: int
    http_port: int | None
    _grpc_server: grpc.aio.Server
    _health: health.aio.HealthServicer
    _http_runner: object | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    _admin_server: grpc.aio.Server | None = None
    tls: bool = False
    _stopped: bool = False

    @staticmethod
    def _reach(host: str) -> str:
        """Where a client on this machine connects (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host

    @property
    def connect_host(self) -> str:
        return self._reach(self.host)

    @property
    def grpc_target(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def admin_target(self) -> str | None:
        return None if self.admin_port is None else f"{self._reach(self.admin_host)}:{self.admin_port}"

    @property
    def http_url(self) -> str | None:
        scheme = "https" if self.tls else "http"
        return None if self.http_port is None else f"{scheme}://{self.connect_host}:{self.http_port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, give in-flight ones `grace_s` to finish, then cancel (abort) them.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.gateway.serving = False
        await self._health.enter_graceful_shutdown()
        runner, self._http_runner = self._http_runner, None
        # The doors drain at once, so stopping takes at most about grace_s.
        await asyncio.gather(self._grpc_server.stop(grace_s), runner.cleanup() if runner else asyncio.sleep(0),
                             self._admin_server.stop(grace_s) if self._admin_server else asyncio.sleep(0))
        self.gateway.close()


def grpc_options(server: ServerConfig, supports_images: bool = True) -> list[tuple[str, int]]:
    """Channel arguments of the gRPC servers: message size (for a model without images no larger
    than an acceptable request can be, so that no more is ever buffered), streams per connection,
    idle and age limits, and keepalive enforcement (a client pinging too often is disconnected)."""
    c = server.connections
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", caps.request_bytes(server.limits, supports_images)),
        ("grpc.max_send_message_length", server.limits.max_request_bytes),
        ("grpc.max_concurrent_streams", c.grpc_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(c.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(c.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(server.request_timeout_s)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(c.grpc_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_time_ms", 60_000),      # the server pings idle connections to find dead peers
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BindError(f"cannot read {what} {path}: {err.strerror or err}") from None


def grpc_credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (and mutual TLS with client_ca_file) for the gRPC servers; None: plaintext."""
    tls = server.tls
    if not tls.enabled:
        return None
    ca = _read(tls.client_ca_file, "server.tls.client_ca_file") if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file, "server.tls.key_file"), _read(tls.cert_file, "server.tls.cert_file"))],
        root_certificates=ca, require_client_auth=ca is not None)


def bind_grpc(grpc_server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        port = grpc_server.add_secure_port(address, creds) if creds else grpc_server.add_insecure_port(address)
    except RuntimeError as err:
        raise BindError(f"cannot bind gRPC to {address}: {err}") from None
    if port == 0:
        raise BindError(f"cannot bind gRPC to {address} (address in use?)")
    return port


MMAP_THRESHOLD_BYTES = 1 << 20


def keep_large_allocations_returnable() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mmap, returned to the OS on
    free. By default glibc raises that threshold after freeing a large block (up to 32 MiB), so
    the buffers of a few oversized requests (refused, then freed) stay in the heap for good: the
    gateway grew 38% after the oversized attacks of tests/attacks.py, 6% with this. A setting of
    the whole process, so `triptych serve` (whose process hosts the gateway and the router, not
    the workers) makes it. A no-op (False) where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD_BYTES))   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


async def start(router: Router, server: ServerConfig, *, sessions: SessionStore | None = None,
                metrics: Metrics | None = None, keys: KeyRing | None = None,
                http_grace_s: float = 5.0) -> RunningGateway:  # fmt: skip
    """Bind gRPC on server.grpc_port, HTTP on http_port (unless None) and the admin service on
    admin_host:admin_port (unless None); 0: a free port. Returns once all accept connections.
    `keys`: the API keys (default: loaded from server.auth). `http_grace_s`: how long stop() lets
    in-flight HTTP requests finish (gRPC's is stop()'s grace_s)."""
    from cluster import admin

    keys = keys if keys is not None else KeyRing.load(server.auth)
    gateway = Gateway(router, sessions=sessions if sessions is not None else SessionStore(server.sessions),
                      metrics=metrics, keys=keys, limits=server.limits, max_queued_requests=server.max_queued_requests)
    creds = grpc_credentials(server)
    supports_images = router.model_info().supports_images
    # Calls beyond this are refused by gRPC before their messages are buffered: with the message
    # cap, this bounds the memory that callers (authenticated or not yet) can make the server hold.
    grpc_server = grpc.aio.server(options=grpc_options(server, supports_images),
                                  maximum_concurrent_rpcs=2 * server.max_queued_requests + 64)
    gateway.add_to_server(grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE_NAME, health_name, reflection.SERVICE_NAME), grpc_server)
    grpc_port = bind_grpc(grpc_server, f"{server.host}:{server.grpc_port}", creds)
    await grpc_server.start()
    running = RunningGateway(gateway, server.host, grpc_port, None, grpc_server, health_servicer,
                             admin_host=server.admin_host, tls=server.tls.enabled)
    try:
        if server.admin_port is not None:
            running._admin_server, running.admin_port = await admin.serve(
                router, gateway, keys, server, creds, health_servicer)
        if server.http_port is not None:
            from cluster import http_api  # aiohttp only when the HTTP door is on

            try:
                running._http_runner, running.http_port = await http_api.serve(
                    gateway, server, shutdown_timeout_s=http_grace_s)
            except OSError as err:
                raise BindError(f"cannot bind HTTP to {server.host}:{server.http_port}: "
                                f"{err.strerror or err}") from None
    except BaseException:
        await grpc_server.stop(None)
        if running._admin_server is not None:
            await running._admin_server.stop(None)
        gateway.close()
        raise
    gateway.serving = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running
