"""OpenAI-compatible HTTP door of the gateway (aiohttp), on the same router as gRPC.

    POST /v1/chat/completions   POST /v1/completions   (stream: SSE chunks ending in data: [DONE])
    GET  /v1/models  /v1/models/{id}   GET /health   GET /metrics (Prometheus text)

Requests go through `Gateway.events`, so sessions, metrics, limits and the in-flight bookkeeping
are the gRPC door's. With serving keys configured, /v1/* and /metrics need `Authorization: Bearer
<key>` (401 otherwise); /health never does. Every error is OpenAI-shaped JSON, {"error":
{"message", "type", "param", "code"}}, with the status of its RouterError kind (400 / 401 / 404 /
408 / 413 / 429 / 503 / 504 / 500); a malformed request names the field at fault (also in
`param`), internal errors say only that (the cause goes to the log) and the server keeps serving.
An aborted request ends as an error too (499, code `aborted`): OpenAI has no finish_reason for it. A body must arrive within
server.connections.http_read_timeout_s (408 otherwise); a connection that sends no whole request
within http_keepalive_s is closed. Only `data:` image URLs are accepted (the server
fetches nothing). Extensions beyond OpenAI: `top_k`, `ignore_eos` in requests, an
`X-Request-Id` header (the id `Abort` takes; echoed back), and `timings` (server-measured phase
times, seconds) in non-streaming responses and in the last streamed chunk.

Turning a body into the router's input (every OpenAI field, its checks and caps) is
cluster/openai_request.py; this module holds the routes, the response shapes and the server.

`n` choices are n requests of their own (ids `<id>-<i>`), answered as one response (streamed:
chunks of all choices as they come, each naming its `index`); one refused refuses the whole. They
share the prompt's prefill: the later choices start once the first one's prefill is done and go
where its KV is (through the prefix cache with `engine.prefix_caching`; otherwise through a cache
of their own, cluster/dispatch.py `_salt`), so they compute only the prompt's last block.

A streaming request is validated up to its first event before the SSE response starts, so
requests refused before generation get a real HTTP status. If the client disconnects mid-stream,
aiohttp cancels the handler (handler_cancellation) and the request is aborted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import time
from dataclasses import asdict, replace
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from cluster import limits as caps
from cluster.auth import Principal
from cluster.config import ServerConfig
from cluster.gateway_service import UNAUTHENTICATED_MESSAGE, Gateway
from cluster.metrics import CONTENT_TYPE
from cluster.openai_request import json_field, parse_chunks, parse_n
from cluster.router_api import ErrorKind, FinalEvent, GenerateInput, RouterError
from engine.sequence import FinishReason, TokenLogprob

log = logging.getLogger(__name__)

STATUS_REFRESH_TIMEOUT_S = 2.0
OPEN_PATHS = frozenset({"/health"})  # reachable without a key
PRINCIPAL = web.RequestKey("principal", Principal)

_STATUS = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorKind.DEADLINE_EXCEEDED: (504, "timeout_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
    ErrorKind.FAILED_PRECONDITION: (409, "conflict_error"),
    ErrorKind.UNAUTHENTICATED: (401, "authentication_error"),
}


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> web.Response:
    """An OpenAI error object: message, type, param (the request field at fault, or null), code."""
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status
    )


# OpenAI's finish_reason has no "aborted": a request aborted before it finished (gRPC Abort of its
# X-Request-Id, or the server stopping) ends as an error, status 499 (client closed request, as
# gRPC CANCELLED maps to HTTP) or, streamed, an error event.
ABORTED = {"message": "the request was aborted before it finished", "type": "request_aborted", "param": None}


def router_error_response(err: RouterError) -> web.Response:
    status, type_ = _STATUS[err.kind]
    resp = error_response(status, err.message, type_, err.kind.value, err.param)
    if err.kind is ErrorKind.UNAUTHENTICATED:
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def _middlewares(gateway: Gateway) -> list:
    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RouterError as err:
            return router_error_response(gateway.refuse(err, "http"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            reason = {413: "body_too_large", 408: "slow_client"}.get(exc.status, "bad_request")
            gateway.refuse(RouterError(ErrorKind.INVALID_ARGUMENT, exc.reason, reason), "http")
            return error_response(
                exc.status,
                f"{request.method} {caps.clip(request.path)}: {exc.reason}",
                "invalid_request_error",
                exc.reason.lower().replace(" ", "_"),
            )
        except Exception:  # a bug: answer 500 and keep serving; the cause goes to the log
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(500, "internal error", "server_error", ErrorKind.INTERNAL.value)

    @web.middleware
    async def authenticate(request: web.Request, handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        who = gateway.keys.serving(request.headers.get("Authorization"))
        if who is None:
            raise gateway.refuse(
                RouterError(ErrorKind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, "unauthenticated"), "http"
            )
        request[PRINCIPAL] = who
        return await handler(request)

    return [errors, authenticate]


# ---------------------------------------------------------------------------------------------
# Handlers


class _Api:
    def __init__(self, gateway: Gateway, read_timeout_s: float, max_body_bytes: int) -> None:
        self.gateway = gateway
        self.read_timeout_s = read_timeout_s
        self.max_body_bytes = max_body_bytes

    async def _read(self, request: web.Request) -> list[bytes]:
        """The body as the chunks that arrived, joined off the loop (parse_chunks): growing one
        buffer here would copy a 30 MB body on the loop, a chunk at a time. Refused (413) past the
        size limit: by its Content-Length before reading, else while reading."""
        limit = self.max_body_bytes
        if (request.content_length or 0) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(
                reason=f"the body did not arrive within {self.read_timeout_s:g}s "
                f"(server.connections.http_read_timeout_s)"
            ) from None
        return chunks

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, *, chat: bool):
        with self.gateway.enter(request[PRINCIPAL], "http"):  # counted before the body is read
            return await self._complete_entered(request, chat=chat)

    async def _complete_entered(self, request: web.Request, *, chat: bool):
        chunks = await self._read(request)
        info = self.gateway.router.model_info()
        body, inp, sampling = await self.gateway.off_loop(
            request[PRINCIPAL], parse_chunks, chunks, chat, info, self.gateway.limits
        )
        model = info.name
        stream = json_field(body, "stream", bool, "a boolean", False)
        options = json_field(body, "stream_options", dict, "an object", {})
        rid = request.headers.get("X-Request-Id")
        n = parse_n(body, self.gateway.limits)
        if rid:
            # with n > 1 the choices' ids (<id>-<i>, what Abort takes) must fit the limit too
            caps.check_id(
                "X-Request-Id" if n == 1 else f"X-Request-Id with n={n}", rid + _suffix(n), self.gateway.limits
            )
        rid = rid or self.gateway.new_request_id()
        # n choices: n requests of their own (ids rid-0 .. rid-(n-1)); seeded choice i draws from seed + i;
        # they carry one unguessable id, by which they share the prompt's prefill and no one else does
        group = secrets.token_hex(16) if n > 1 else ""
        inputs = [
            GenerateInput(
                request_id=rid + _suffix(n, i),
                sampling=sampling
                if sampling.seed is None or i == 0
                else replace(sampling, seed=(sampling.seed + i) % 2**64),
                choices_of=group,
                **inp,
            )
            for i in range(n)
        ]
        streams = [self.gateway.events(x, principal=request[PRINCIPAL], door="http") for x in inputs]
        try:
            firsts = await _firsts(streams, staged=n > 1 and self.gateway.router.shares_choices())
            fmt = _Format(("chatcmpl-" if chat else "cmpl-") + rid, model, chat, sampling.logprobs is not None)
            if stream:
                include_usage = bool(options.get("include_usage"))
                return await self._stream(request, rid, fmt, _merge(firsts, streams), n, include_usage)
            ended = await asyncio.gather(*(_final(f, s) for f, s in zip(firsts, streams)))
            finals = [final for final, _ in ended]
        finally:
            await asyncio.gather(*(s.aclose() for s in streams))
        failed = next((f for f in finals if f.finish_reason is FinishReason.ERROR), None)
        if failed is not None:
            status, type_ = _STATUS[failed.error_kind or ErrorKind.INTERNAL]
            return error_response(status, failed.error or "generation failed", type_, "generation_failed")
        if any(f.finish_reason is FinishReason.ABORT for f in finals):
            return web.json_response({"error": {**ABORTED, "code": "aborted"}}, status=499)
        return web.json_response(fmt.whole(finals, [lps for _, lps in ended]), headers={"X-Request-Id": rid})

    async def _stream(self, request, rid, fmt, events, n: int, include_usage: bool) -> web.StreamResponse:
        """SSE of the n choices' events as they come (each chunk names its choice), one final
        chunk per choice, then usage (if asked) and [DONE]. A choice that fails or is aborted ends
        the stream with an error event (the others are aborted by the caller)."""
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Request-Id": rid}
        )
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        try:
            if fmt.chat:
                for i in range(n):
                    await send(fmt.chunk({"role": "assistant", "content": ""}, None, include_usage, i))
            finals: list[FinalEvent] = []
            async for i, event in events:
                if not isinstance(event, FinalEvent):
                    if event.text or event.logprobs:
                        await send(fmt.chunk(event.text, None, include_usage, i, event.logprobs))
                    continue
                if event.finish_reason is FinishReason.ERROR:  # too late for a status: an error event
                    await send(
                        {
                            "error": {
                                "message": event.error or "generation failed",
                                "type": "server_error",
                                "param": None,
                                "code": "generation_failed",
                            }
                        }
                    )
                    break
                if event.finish_reason is FinishReason.ABORT:
                    await send({"error": {**ABORTED, "code": "aborted"}})
                    break
                last = fmt.chunk({} if fmt.chat else "", event.finish_reason.value, include_usage, i)
                last["timings"] = asdict(event.timings)
                await send(last)
                finals.append(event)
            else:
                if include_usage:
                    await send({**fmt.chunk(None, None, False), "choices": [], "usage": _usage(finals)})
            await send(b"[DONE]")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away; the caller's aclose() aborts
            log.info("HTTP client of request %s disconnected", rid)
        finally:
            await events.aclose()
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        card = self._model_card()
        if request.match_info["model"] != card["id"]:
            raise RouterError(
                ErrorKind.NOT_FOUND,
                f"model {caps.clip(request.match_info['model'])} does not exist; this server serves {card['id']!r}",
                "unknown_model",
            )
        return web.json_response(card)

    def _model_card(self) -> dict:
        info = self.gateway.router.model_info()
        return {
            "id": info.name,
            "object": "model",
            "created": 0,
            "owned_by": "triptych",
            "max_model_len": info.max_model_len,
        }

    async def health(self, request: web.Request) -> web.Response:
        if self.gateway.serving:
            return web.json_response({"status": "serving"})
        return web.json_response({"status": "not serving"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            status = await asyncio.wait_for(self.gateway.cluster_status(), STATUS_REFRESH_TIMEOUT_S)
            self.gateway.metrics.update_cluster(status)
        except Exception as err:  # serve the last known gauges rather than fail the scrape
            log.warning("metrics: cluster status unavailable: %s", err)
        return web.Response(body=self.gateway.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


class _Format:
    """OpenAI response shapes for one request (chat.completion or text_completion); with
    `logprobs`, each choice's log-probabilities in the endpoint's own shape (_logprobs)."""

    def __init__(self, id_: str, model: str, chat: bool, logprobs: bool = False) -> None:
        self.id, self.model, self.chat, self.logprobs = id_, model, chat, logprobs
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # choice -> characters of token text so far (text_offset)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, index: int, lps: Sequence[TokenLogprob]) -> dict | None:
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}. Completions: tokens,
        token_logprobs, top_logprobs ({text: logprob}) and text_offset, continuing the choice's
        earlier chunks. None when the request did not ask."""
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [_chat_logprob(lp) for lp in lps], "refusal": None}
        offset = self._offsets.get(index, 0)
        offsets = []
        for lp in lps:
            offsets.append(offset)
            offset += len(lp.token)
        self._offsets[index] = offset
        return {
            "tokens": [lp.token for lp in lps],
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{text: v for _, text, v in lp.top} for lp in lps],
            "text_offset": offsets,
        }

    def chunk(
        self,
        delta: Any,
        finish_reason: str | None,
        include_usage: bool,
        index: int = 0,
        lps: Sequence[TokenLogprob] = (),
    ) -> dict:
        logprobs = self._logprobs(index, lps) if lps else None
        if self.chat:
            choice = {
                "index": index,
                "delta": {"content": delta} if isinstance(delta, str) else delta,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def whole(self, finals: list[FinalEvent], logprobs: list[list[TokenLogprob]]) -> dict:
        """The response of the choices' final events and log-probabilities (`timings`: the first
        choice's)."""
        choices = []
        for i, (final, lps) in enumerate(zip(finals, logprobs)):
            reason = final.finish_reason.value
            if self.chat:
                message = {"role": "assistant", "content": final.text}
                choices.append(
                    {"index": i, "message": message, "logprobs": self._logprobs(i, lps), "finish_reason": reason}
                )
            else:
                choices.append(
                    {"index": i, "text": final.text, "logprobs": self._logprobs(i, lps), "finish_reason": reason}
                )
        head = self._head("chat.completion" if self.chat else "text_completion")
        return {**head, "choices": choices, "usage": _usage(finals), "timings": asdict(finals[0].timings)}


async def _firsts(streams: list, staged: bool) -> list:
    """The first event of each choice's stream (starting it). `staged`: the first choice's
    prefill goes first and the others start once it is done, so that they find its prompt's KV
    cached (the router routes them there) instead of each computing it. A refusal
    (RouterError) of any choice is raised: it becomes the HTTP status."""
    firsts: list = []
    if staged:
        firsts = await asyncio.gather(anext(streams[0]), return_exceptions=True)
        streams = streams[1:] if not isinstance(firsts[0], BaseException) else []
    firsts += await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    for first in firsts:
        if isinstance(first, BaseException):
            raise first
    return firsts


def _usage(finals: list[FinalEvent]) -> dict:
    """OpenAI usage of a request's choices: the prompt once, every choice's completion tokens."""
    prompt = finals[0].prompt_tokens
    completion = sum(f.completion_tokens for f in finals)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": finals[0].cached_tokens},
    }


def _suffix(n: int, choice: int | None = None) -> str:
    """What choice `choice` (default: the last) of n adds to the request id: nothing for n = 1."""
    return "" if n == 1 else f"-{n - 1 if choice is None else choice}"


def _chat_logprob(lp: TokenLogprob) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.token.encode()),
        "top_logprobs": [{"token": text, "logprob": v, "bytes": list(text.encode())} for _, text, v in lp.top],
    }


async def _final(event, events) -> tuple[FinalEvent, list[TokenLogprob]]:
    """One choice's final event and its tokens' log-probabilities, from its first event on."""
    lps: list[TokenLogprob] = []
    while not isinstance(event, FinalEvent):
        lps.extend(event.logprobs)
        event = await anext(events)
    return event, lps


async def _merge(firsts: list, streams: list):
    """(choice index, event) of every choice's stream as they come, each choice's first event
    first; ends when every choice has ended (or when closed: its readers are cancelled)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def read(i: int, first, events) -> None:
        try:
            await queue.put((i, first))
            event = first
            while not isinstance(event, FinalEvent):
                event = await anext(events)
                await queue.put((i, event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((i, exc))

    readers = [asyncio.ensure_future(read(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams))]
    try:
        left = len(readers)
        while left:
            i, event = await queue.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, FinalEvent):
                left -= 1
            yield i, event
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def build_app(gateway: Gateway, server: ServerConfig = ServerConfig()) -> web.Application:
    max_body = caps.request_bytes(server.limits, gateway.router.model_info().supports_images)
    api = _Api(gateway, server.connections.http_read_timeout_s, max_body)
    app = web.Application(middlewares=_middlewares(gateway), client_max_size=max_body)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/v1/models/{model}", api.model)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", api.metrics)
    return app


def ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP door from server.tls (client certificates required with client_ca_file)."""
    tls = server.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        ctx.load_verify_locations(tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(gateway: Gateway, server: ServerConfig, shutdown_timeout_s: float = 5.0) -> tuple[web.AppRunner, int]:
    """Start the HTTP server on server.host:http_port; returns its runner (`await
    runner.cleanup()` stops it) and bound port."""
    runner = web.AppRunner(
        build_app(gateway, server),
        handler_cancellation=True,
        access_log=logging.getLogger("triptych.access") if server.access_log else None,
        access_log_format='%a "%r" %s %b %Tfs request_id=%{X-Request-Id}o',
        shutdown_timeout=shutdown_timeout_s,
        keepalive_timeout=server.connections.http_keepalive_s,
    )
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.http_port, ssl_context=ssl_context(server))
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
