"""The gateway: one router behind two doors, gRPC (`triptych.v1.Triptych`) and OpenAI HTTP.

    client ──gRPC──▶ Gateway (servicer) ─┐
                                         ├─▶ Gateway.events() ──▶ Router.generate() ──▶ events
    client ──HTTP──▶ http_api handlers ──┘      sessions, metrics, in-flight ids

`Gateway.events` is the request path both doors share. Its promise to a door: it raises
RouterError before the first event (bad input, overload: the door turns that into a status)
and otherwise yields TokenEvents then exactly one FinalEvent, even when the router misbehaves
(an exception after the first event, or a stream without a final event, become
FinalEvent(ERROR)). Leaving it early (client cancelled, disconnected, deadline passed) closes
the router's iterator, which aborts the request.

`start(router, server_config)` binds both doors (port 0: a free port) and returns a
RunningGateway with the bound ports; `RunningGateway.stop()` stops serving.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import ServerConfig
from cluster.metrics import Metrics
from cluster.router_api import (
    ChatMessage,
    ErrorKind,
    FinalEvent,
    GenerateInput,
    Role,
    Router,
    RouterError,
    TokenEvent,
)
from cluster.sessions import SessionStore, trim_to_fit
from engine.errors import InvalidRequestError
from engine.sequence import FinishReason, SamplingParams
from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Triptych"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TriptychAdmin"].full_name
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # requests carry images
CHAT_ROLES = ("system", "user", "assistant")

GRPC_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}
_FINISH_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
_ROLE_PB = {Role.ENCODE: pb.ROLE_ENCODE, Role.PREFILL: pb.ROLE_PREFILL, Role.DECODE: pb.ROLE_DECODE,
            Role.COLOCATED: pb.ROLE_COLOCATED}  # fmt: skip
_MODE_PB = {"colocated": pb.MODE_COLOCATED, "disaggregated": pb.MODE_DISAGGREGATED}


def invalid(message: str) -> RouterError:
    return RouterError(ErrorKind.INVALID_ARGUMENT, message)


def make_sampling(*, max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int = 0,
                  seed: int | None = None, stop: tuple[str, ...] = (), ignore_eos: bool = False,
                  max_model_len: int) -> SamplingParams:  # fmt: skip
    """SamplingParams from API values; None / 0 max_tokens means up to max_model_len, unset
    temperature and top_p mean 1.0 (docs/API.md). Bad values raise RouterError(INVALID_ARGUMENT)."""
    if top_k == -1:
        top_k = 0
    try:
        return SamplingParams(
            max_tokens=max_tokens or max_model_len,
            temperature=1.0 if temperature is None else float(temperature),
            top_p=1.0 if top_p is None else float(top_p),
            top_k=top_k, seed=seed, stop=tuple(stop), ignore_eos=ignore_eos,
        )  # fmt: skip
    except InvalidRequestError as err:
        raise invalid(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Proto <-> router types


def input_from_pb(req: pb.GenerateRequest, request_id: str, max_model_len: int,
                  deadline_s: float | None) -> GenerateInput:  # fmt: skip
    kind = req.WhichOneof("input")
    if kind is None:
        raise invalid("no input: set one of prompt, chat, token_ids")
    if req.session_id and kind != "chat":
        raise invalid(f"session_id needs chat input, got {kind}")
    s = req.sampling
    sampling = make_sampling(
        max_tokens=s.max_tokens,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k, seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), ignore_eos=s.ignore_eos, max_model_len=max_model_len,
    )  # fmt: skip
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
        return GenerateInput(token_ids=tuple(req.token_ids.ids), images=images, **common)
    if images:
        raise invalid("chat input carries its images inside its messages; GenerateRequest.images must be empty")
    if not req.chat.messages:
        raise invalid("chat input has no messages")
    return GenerateInput(messages=tuple(_message_from_pb(i, m) for i, m in enumerate(req.chat.messages)), **common)


def _message_from_pb(i: int, msg: pb.ChatMessage) -> ChatMessage:
    if msg.role not in CHAT_ROLES:
        raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {msg.role!r}")
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


class Gateway(pb_grpc.TriptychServicer):
    """Serves the Triptych gRPC service and the shared request path (`events`) on one router."""

    def __init__(self, router: Router, *, sessions: SessionStore | None = None,
                 metrics: Metrics | None = None) -> None:  # fmt: skip
        self.router = router
        self.sessions = sessions if sessions is not None else SessionStore()
        self.metrics = metrics if metrics is not None else Metrics()
        self.serving = False  # set by start(); cleared when stopping
        self._in_flight: set[str] = set()

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    # -- the shared request path ----------------------------------------------------------

    async def events(self, inp: GenerateInput, *, session_id: str | None = None,
                     door: str = "grpc") -> AsyncIterator[TokenEvent | FinalEvent]:  # fmt: skip
        """Stream one request; see the module docstring for what this promises."""
        new_messages = inp.messages
        try:
            if not self.serving:
                raise RouterError(ErrorKind.UNAVAILABLE, "the server is not serving (starting or shutting down)")
            if inp.request_id in self._in_flight:
                raise invalid(f"request_id {inp.request_id!r} is already in flight")
            if session_id:
                if inp.messages is None:
                    raise invalid("session_id needs chat input (messages)")
                inp = replace(inp, messages=self._with_history(session_id, inp))
            stream = self.router.generate(inp)
        except RouterError as err:
            self.metrics.record_rejected(err.kind.value, door)
            raise
        rid = inp.request_id
        self._in_flight.add(rid)
        recorder = self.metrics.start(door)
        texts: list[str] = []
        ntokens = 0
        final: FinalEvent | None = None
        try:
            while final is None:
                try:
                    event = await anext(stream)
                except StopAsyncIteration:
                    final = FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts),
                                       error="the router ended the stream without a final event")  # fmt: skip
                    break
                except RouterError as err:
                    if ntokens == 0 and not texts:
                        self.metrics.record_rejected(err.kind.value, door)
                        raise
                    final = FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts), error=err.message)
                    break
                except Exception as err:  # a router bug: never leave the client hanging
                    log.exception("router failed on request %s", rid)
                    if ntokens == 0 and not texts:
                        self.metrics.record_rejected(ErrorKind.INTERNAL.value, door)
                        raise RouterError(ErrorKind.INTERNAL, f"router failed: {err!r}") from err
                    final = FinalEvent(FinishReason.ERROR, 0, ntokens, "".join(texts), error=f"router failed: {err!r}")
                    break
                if isinstance(event, FinalEvent):
                    final = event
                    break
                ntokens += len(event.token_ids)
                texts.append(event.text)
                recorder.on_tokens(len(event.token_ids))
                yield event
            if not final.text and texts:  # FinalEvent.text is the whole completion
                final = replace(final, text="".join(texts))
            recorder.finish(final)
            if session_id and final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                self.sessions.append_turn(session_id, new_messages, final.text)
            yield final
        finally:
            self._in_flight.discard(rid)
            if final is None:  # left early: the client went away
                recorder.finish(FinalEvent(FinishReason.ABORT, 0, ntokens, "".join(texts)))
            await _close(stream)

    def _with_history(self, session_id: str, inp: GenerateInput) -> tuple[ChatMessage, ...]:
        history = self.sessions.history(session_id)
        if not history:
            return inp.messages
        max_len = self.router.model_info().max_model_len
        # Old turns are dropped (oldest first) so that the prompt leaves room for the reply.
        budget = max_len - min(inp.sampling.max_tokens, max_len // 2)
        try:
            kept = trim_to_fit(history, inp.messages, lambda ms: len(self.router.apply_chat_template(ms)), budget)
        except RouterError:
            kept = history  # the router names the problem when it sees the request
        if len(kept) != len(history):
            self.sessions.replace(session_id, kept)
        return (*kept, *inp.messages)

    async def abort(self, request_id: str) -> bool:
        return await self.router.abort(request_id)

    # -- gRPC ---------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        rid = request.request_id or self.new_request_id()
        try:
            inp = input_from_pb(request, rid, self.router.model_info().max_model_len, context.time_remaining())
        except RouterError as err:
            self.metrics.record_rejected(err.kind.value, "grpc")
            await context.abort(GRPC_CODES[err.kind], err.message)
        events = self.events(inp, session_id=request.session_id or None, door="grpc")
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
        return pb.AbortResponse(aborted=await self.abort(request.request_id))

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        info = self.router.model_info()
        return pb.GetModelInfoResponse(model=info.name, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                                       eos_token_ids=list(info.eos_token_ids), dtype=info.dtype,
                                       supports_images=info.supports_images)  # fmt: skip

    async def GetClusterStatus(self, request, context) -> pb.GetClusterStatusResponse:
        try:
            status = await self.router.cluster_status()
        except RouterError as err:
            await context.abort(GRPC_CODES[err.kind], err.message)
        pools = []
        for role in Role:
            workers = [w for w in status.workers if w.role is role]
            if workers:
                pools.append(pb.PoolStatus(role=_ROLE_PB[role], workers=[
                    pb.WorkerStatus(worker_id=w.worker_id, role=_ROLE_PB[w.role], node_id=w.node_id, alive=w.alive,
                                    queue_length=w.queue_length, running=w.running, kv_blocks_used=w.kv_blocks_used,
                                    kv_blocks_total=w.kv_blocks_total, epoch=w.epoch)
                    for w in workers]))  # fmt: skip
        return pb.GetClusterStatusResponse(mode=_MODE_PB.get(status.mode, pb.MODE_UNSPECIFIED), pools=pools,
                                           role_switches=[switch_to_pb(s) for s in status.role_switches],
                                           role_switch_count=max(status.switch_count, len(status.role_switches)),
                                           restarts=[pb.WorkerRestarts(worker_id=w, restarts=n) for w, n in status.restarts])


def switch_to_pb(s) -> pb.RoleSwitch:
    return pb.RoleSwitch(worker_id=s.worker_id, from_role=_ROLE_PB[s.from_role], to_role=_ROLE_PB[s.to_role],
                         at_unix_s=s.at_unix_s, reason=s.reason, epoch=s.epoch, drain_s=s.drain_s, switch_s=s.switch_s)


_ROLE_FROM_PB = {pb.ROLE_PREFILL: Role.PREFILL, pb.ROLE_DECODE: Role.DECODE, pb.ROLE_ENCODE: Role.ENCODE,
                 pb.ROLE_COLOCATED: Role.COLOCATED}  # fmt: skip


class AdminService(pb_grpc.TriptychAdminServicer):
    """`triptych.v1.TriptychAdmin`: operator calls (role switching)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def SetWorkerRole(self, request: pb.SetWorkerRoleRequest, context) -> pb.SetWorkerRoleResponse:
        role = _ROLE_FROM_PB.get(request.role)
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "role must be ROLE_ENCODE, ROLE_PREFILL or ROLE_DECODE")
        if not request.worker_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "worker_id is empty")
        if request.drain_timeout_s < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "drain_timeout_s must be >= 0")
        try:
            record = await self.router.set_worker_role(request.worker_id, role, request.reason or "manual",
                                                       request.drain_timeout_s or 60.0)
        except RouterError as err:
            await context.abort(GRPC_CODES[err.kind], err.message)
        return pb.SetWorkerRoleResponse(switch=switch_to_pb(record))


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
    _stopped: bool = False

    @property
    def connect_host(self) -> str:
        """Where a client on this machine connects (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    @property
    def grpc_target(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str | None:
        return None if self.http_port is None else f"http://{self.connect_host}:{self.http_port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, give in-flight ones `grace_s` to finish, then cancel (abort) them.
        Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.gateway.serving = False
        await self._health.enter_graceful_shutdown()
        runner, self._http_runner = self._http_runner, None
        # Both doors drain at once, so stopping takes at most about grace_s.
        await asyncio.gather(self._grpc_server.stop(grace_s), runner.cleanup() if runner else asyncio.sleep(0))


async def start(router: Router, server: ServerConfig, *, sessions: SessionStore | None = None,
                metrics: Metrics | None = None, http_grace_s: float = 5.0) -> RunningGateway:  # fmt: skip
    """Bind gRPC on server.grpc_port and, unless server.http_port is None, HTTP on http_port
    (0: a free port); return once both accept connections. `http_grace_s`: how long stop()
    lets in-flight HTTP requests finish (gRPC's is stop()'s grace_s)."""
    gateway = Gateway(router, sessions=sessions, metrics=metrics)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    grpc_server = grpc.aio.server(options=options)
    pb_grpc.add_TriptychServicer_to_server(gateway, grpc_server)
    pb_grpc.add_TriptychAdminServicer_to_server(AdminService(router), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((SERVICE_NAME, ADMIN_SERVICE_NAME, health_name, reflection.SERVICE_NAME),
                                        grpc_server)
    address = f"{server.host}:{server.grpc_port}"
    try:
        grpc_port = grpc_server.add_insecure_port(address)
    except RuntimeError as err:
        raise BindError(f"cannot bind gRPC to {address}: {err}") from None
    if grpc_port == 0:
        raise BindError(f"cannot bind gRPC to {address} (address in use?)")
    await grpc_server.start()
    running = RunningGateway(gateway, server.host, grpc_port, None, grpc_server, health_servicer)
    if server.http_port is not None:
        from cluster import http_api  # aiohttp only when the HTTP door is on

        try:
            running._http_runner, running.http_port = await http_api.serve(gateway, server.host, server.http_port,
                                                                           shutdown_timeout_s=http_grace_s)
        except OSError as err:
            await grpc_server.stop(None)
            raise BindError(f"cannot bind HTTP to {server.host}:{server.http_port}: {err.strerror or err}") from None
    gateway.serving = True
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running
