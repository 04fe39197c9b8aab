"""OpenAI-compatible HTTP door of the gateway (aiohttp), on the same router as gRPC.

    POST /v1/chat/completions   POST /v1/completions   (stream: SSE chunks ending in data: [DONE])
    GET  /v1/models  /v1/models/{id}   GET /health   GET /metrics (Prometheus text)

Requests go through `Gateway.events`, so sessions, metrics, limits and the in-flight bookkeeping
are the gRPC door's. With serving keys configured, /v1/* and /metrics need `Authorization: Bearer
<key>` (401 otherwise); /health never does. Every error is OpenAI-shaped JSON, {"error":
{"message", "type", "code"}}, with the status of its RouterError kind (400 / 401 / 404 / 408 /
413 / 429 / 503 / 504 / 500); a malformed request names the field at fault, internal errors say
only that (the cause goes to the log) and the server keeps serving. A body must arrive within
server.connections.http_read_timeout_s (408 otherwise); a connection that sends no whole request
within http_keepalive_s is closed. Only `data:` image URLs are accepted (the server
fetches nothing). Extensions beyond OpenAI: `top_k`, `ignore_eos` in requests, an
`X-Request-Id` header (the id `Abort` takes; echoed back), and `timings` (server-measured phase
times, seconds) in non-streaming responses and in the last streamed chunk.

A streaming request is validated up to its first event before the SSE response starts, so
requests refused before generation get a real HTTP status. If the client disconnects mid-stream,
aiohttp cancels the handler (handler_cancellation) and the request is aborted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import ssl
import time
from dataclasses import asdict
from typing import Any

from aiohttp import web

from cluster import limits as caps
from cluster.auth import Principal
from cluster.config import LimitsConfig, ServerConfig
from cluster.gateway import CHAT_ROLES, UNAUTHENTICATED_MESSAGE, Gateway, invalid
from cluster.metrics import CONTENT_TYPE
from cluster.router_api import ChatMessage, ErrorKind, FinalEvent, GenerateInput, ModelInfo, RouterError
from engine.sequence import FinishReason

log = logging.getLogger(__name__)

STATUS_REFRESH_TIMEOUT_S = 2.0
OPEN_PATHS = frozenset({"/health"})      # reachable without a key
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
_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*;base64,(?P<data>.*)", re.DOTALL)


def error_response(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "code": code}}, status=status)


def router_error_response(err: RouterError) -> web.Response:
    status, type_ = _STATUS[err.kind]
    resp = error_response(status, err.message, type_, err.kind.value)
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
            return error_response(exc.status, f"{request.method} {caps.clip(request.path)}: {exc.reason}",
                                  "invalid_request_error", exc.reason.lower().replace(" ", "_"))  # fmt: skip
        except Exception:  # a bug: answer 500 and keep serving; the cause goes to the log
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(500, "internal error", "server_error", ErrorKind.INTERNAL.value)

    @web.middleware
    async def authenticate(request: web.Request, handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        who = gateway.keys.serving(request.headers.get("Authorization"))
        if who is None:
            raise gateway.refuse(RouterError(ErrorKind.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE, "unauthenticated"),
                                 "http")
        request[PRINCIPAL] = who
        return await handler(request)

    return [errors, authenticate]


# ---------------------------------------------------------------------------------------------
# Request parsing: every error names the field


def _field(body: dict, name: str, types: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but not a number in JSON terms.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise invalid(f"'{name}' must be {what}, got a boolean")
    if not isinstance(value, types):
        raise invalid(f"'{name}' must be {what}, got {_json_kind(value)}")
    return value


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)  # fmt: skip


def _sampling(body: dict, max_model_len: int, limits: LimitsConfig) -> Any:
    n = _field(body, "n", int, "an integer", 1)
    if n != 1:
        raise invalid(f"'n' must be 1 (one choice per request), got {caps.clip(n)}")
    best_of = _field(body, "best_of", int, "an integer", 1)
    if best_of != 1:
        raise invalid(f"'best_of' must be 1, got {caps.clip(best_of)}")
    for name in ("logprobs", "top_logprobs", "echo", "tools", "functions", "logit_bias", "suffix"):
        if body.get(name):
            raise invalid(f"'{name}' is not supported by this server")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, (int, float), "a number", 0):
            raise invalid(f"'{name}' is not supported by this server (must be 0)")
    fmt = _field(body, "response_format", dict, "an object")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise invalid(f"'response_format' type {caps.clip(fmt.get('type'))} is not supported (only 'text')")
    _field(body, "user", str, "a string")
    max_tokens = _field(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"'max_tokens' must be >= 1, got {caps.clip(max_tokens)}")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list):
        caps.check_count("stop strings", len(stop), limits.max_stop_strings, "max_stop_strings",
                         "too_many_stop_strings")
        if not all(isinstance(s, str) for s in stop):
            raise invalid("'stop' must be a string or an array of strings")
        stops = tuple(stop)
    else:
        raise invalid(f"'stop' must be a string or an array of strings, got {_json_kind(stop)}")
    top_k = _field(body, "top_k", int, "an integer", 0)
    if top_k < -1:
        raise invalid(f"'top_k' must be >= -1, got {caps.clip(top_k)}")
    return caps.sampling(
        max_tokens=max_tokens,
        temperature=_field(body, "temperature", (int, float), "a number"),
        top_p=_field(body, "top_p", (int, float), "a number"),
        top_k=top_k, seed=_field(body, "seed", int, "an integer"), stop=stops,
        ignore_eos=_field(body, "ignore_eos", bool, "a boolean", False), max_model_len=max_model_len, limits=limits,
    )  # fmt: skip


def parse_messages(messages: Any, limits: LimitsConfig = LimitsConfig()) -> tuple[ChatMessage, ...]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of {role, content} objects")
    caps.check_count("messages", len(messages), limits.max_messages, "max_messages", "too_many_messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(f"{where} must be an object, got {_json_kind(msg)}")
        role = msg.get("role")
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {caps.clip(role)}")
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append(ChatMessage(role=role, content=content))
            continue
        if not isinstance(content, list):
            raise invalid(f"{where}.content must be a string or an array of parts, got {_json_kind(content)}")
        texts: list[str] = []
        images: list[bytes] = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                caps.check_count("images in a message", len(images) + 1, limits.max_images, "max_images",
                                 "too_many_images")
                images.append(_image(part.get("image_url"), pwhere, limits))
            else:
                raise invalid(f"{pwhere} must be {{'type': 'text', 'text': ...}} or "
                              f"{{'type': 'image_url', 'image_url': {{'url': 'data:...'}}}}")  # fmt: skip
        out.append(ChatMessage(role=role, content="".join(texts), images=tuple(images)))
    return tuple(out)


def _image(image_url: Any, where: str, limits: LimitsConfig) -> bytes:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise invalid(f"{where}.image_url must be {{'url': 'data:image/...;base64,...'}}")
    if not url.startswith("data:"):
        raise invalid(f"{where}.image_url: only data: URLs (data:image/png;base64,...) are accepted; "
                      f"this server does not fetch {caps.clip(url)}")  # fmt: skip
    # base64 holds 3 bytes per 4 characters: refuse an oversized image before decoding it.
    caps.check_count(f"{where} image bytes", len(url) * 3 // 4 - 64, limits.max_image_bytes, "max_image_bytes",
                     "image_too_large")
    m = _DATA_URI.fullmatch(url)
    if m is None:
        raise invalid(f"{where}.image_url: not a base64 data URL (expected data:image/png;base64,...)")
    try:
        data = base64.b64decode(m.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}.image_url: invalid base64 image data") from None
    if not data:
        raise invalid(f"{where}.image_url: the image is empty")
    return data


def _prompt(body: dict) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"token_ids": tuple(prompt)}
    if isinstance(prompt, list) and len(prompt) > 1:
        raise invalid(f"'prompt' holds {len(prompt)} prompts; send one prompt per request")
    raise invalid("'prompt' must be a string or a non-empty array of token ids")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def json_items_limit(limits: LimitsConfig) -> int:
    """How many JSON values (counted by their separators) a request may hold: every character of
    the prompt a separate token id, and room for the messages' structure."""
    return limits.max_prompt_chars + 16 * limits.max_messages + 1024


def parse_body(raw: bytes, limits: LimitsConfig = LimitsConfig(), supports_images: bool = True) -> dict:
    """The request body as a JSON object; INVALID_ARGUMENT for anything else (NaN and Infinity,
    which Python's json accepts, included). Parsing holds the interpreter lock, so a body larger
    than any acceptable request to this model, or with more values than any (300k messages), is
    refused first by its size and by counting separators, which costs a fraction of parsing it."""
    caps.check_size(len(raw), limits, supports_images)
    items = raw.count(b",") + raw.count(b"{")
    caps.check_count("JSON values in the body", items, json_items_limit(limits), "max_messages and max_prompt_chars",
                     "too_many_items")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid(f"request body is not valid JSON: {err.msg if hasattr(err, 'msg') else 'bad UTF-8'}") from None
    except (ValueError, RecursionError) as err:   # NaN / Infinity, a 5000-digit number, 100k nested arrays
        what = str(err) if "JSON number" in str(err) else "too deeply nested or a number too long"
        raise invalid(f"request body is not valid JSON: {what}") from None
    if not isinstance(body, dict):
        raise invalid(f"request body must be a JSON object, got {_json_kind(body)}")
    return body


def parse_request(raw: bytes, chat: bool, info: ModelInfo, limits: LimitsConfig) -> tuple[dict, dict, Any]:
    """(body, input fields, sampling) of a completion request; runs off the event loop."""
    model, max_model_len = info.name, info.max_model_len
    body = parse_body(raw, limits, info.supports_images)
    name = _field(body, "model", str, "a string", model)
    if name != model:
        raise RouterError(ErrorKind.NOT_FOUND, f"model {caps.clip(name)} does not exist; this server serves {model!r}",
                          "unknown_model")
    inp = {"messages": parse_messages(body.get("messages"), limits)} if chat else _prompt(body)
    return body, inp, _sampling(body, max_model_len, limits)


# ---------------------------------------------------------------------------------------------
# Handlers


class _Api:
    def __init__(self, gateway: Gateway, read_timeout_s: float) -> None:
        self.gateway = gateway
        self.read_timeout_s = read_timeout_s

    async def _read(self, request: web.Request) -> bytes:
        try:
            return await asyncio.wait_for(request.read(), self.read_timeout_s)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(reason=f"the body did not arrive within {self.read_timeout_s:g}s "
                                                f"(server.connections.http_read_timeout_s)") from None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, *, chat: bool):
        with self.gateway.enter(request[PRINCIPAL], "http"):   # counted before the body is read
            return await self._complete_entered(request, chat=chat)

    async def _complete_entered(self, request: web.Request, *, chat: bool):
        raw = await self._read(request)
        info = self.gateway.router.model_info()
        body, inp, sampling = await self.gateway.off_loop(request[PRINCIPAL], parse_request, raw, chat, info,
                                                          self.gateway.limits)
        model = info.name
        stream = _field(body, "stream", bool, "a boolean", False)
        options = _field(body, "stream_options", dict, "an object", {})
        rid = request.headers.get("X-Request-Id")
        if rid:
            caps.check_id("X-Request-Id", rid, self.gateway.limits)
        rid = rid or self.gateway.new_request_id()
        events = self.gateway.events(GenerateInput(request_id=rid, sampling=sampling, **inp),
                                     principal=request[PRINCIPAL], door="http")
        try:
            first = await anext(events)  # RouterError here becomes the HTTP status
            fmt = _Format(("chatcmpl-" if chat else "cmpl-") + rid, model, chat)
            if stream:
                return await self._stream(request, rid, fmt, first, events, bool(options.get("include_usage")))
            final = first
            while not isinstance(final, FinalEvent):
                final = await anext(events)
        finally:
            await events.aclose()
        if final.finish_reason is FinishReason.ERROR:
            status, type_ = _STATUS[final.error_kind or ErrorKind.INTERNAL]
            return error_response(status, final.error or "generation failed", type_, "generation_failed")
        return web.json_response(fmt.whole(final), headers={"X-Request-Id": rid})

    async def _stream(self, request, rid, fmt, event, events, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Request-Id": rid})  # fmt: skip
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        try:
            if fmt.chat:
                await send(fmt.chunk({"role": "assistant", "content": ""}, None, include_usage))
            while not isinstance(event, FinalEvent):
                if event.text:
                    await send(fmt.chunk(event.text, None, include_usage))
                event = await anext(events)
            if event.finish_reason is FinishReason.ERROR:  # too late for a status: an error event
                await send({"error": {"message": event.error or "generation failed", "type": "server_error",
                                      "code": "generation_failed"}})  # fmt: skip
            else:
                last = fmt.chunk({} if fmt.chat else "", event.finish_reason.value, include_usage)
                last["timings"] = asdict(event.timings)
                await send(last)
                if include_usage:
                    await send({**fmt.chunk(None, None, False), "choices": [], "usage": _usage(event)})
            await send(b"[DONE]")
            await resp.write_eof()
        except ConnectionResetError:  # the client went away; the caller's aclose() aborts
            log.info("HTTP client of request %s disconnected", rid)
        return resp

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        card = self._model_card()
        if request.match_info["model"] != card["id"]:
            raise RouterError(ErrorKind.NOT_FOUND, f"model {caps.clip(request.match_info['model'])} does not exist; "
                                                   f"this server serves {card['id']!r}", "unknown_model")  # fmt: skip
        return web.json_response(card)

    def _model_card(self) -> dict:
        info = self.gateway.router.model_info()
        return {"id": info.name, "object": "model", "created": 0, "owned_by": "triptych",
                "max_model_len": info.max_model_len}  # fmt: skip

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
    """OpenAI response shapes for one request (chat.completion or text_completion)."""

    def __init__(self, id_: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = id_, model, chat
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta: Any, finish_reason: str | None, include_usage: bool) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"content": delta} if isinstance(delta, str) else delta,
                      "logprobs": None, "finish_reason": finish_reason}  # fmt: skip
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    def whole(self, final: FinalEvent) -> dict:
        reason = final.finish_reason.value
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": final.text}, "logprobs": None,
                      "finish_reason": reason}  # fmt: skip
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": reason}
            head = self._head("text_completion")
        return {**head, "choices": [choice], "usage": _usage(final), "timings": asdict(final.timings)}


def _usage(final: FinalEvent) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens}  # fmt: skip


def build_app(gateway: Gateway, server: ServerConfig = ServerConfig()) -> web.Application:
    api = _Api(gateway, server.connections.http_read_timeout_s)
    app = web.Application(middlewares=_middlewares(gateway),
                          client_max_size=caps.request_bytes(server.limits, gateway.router.model_info().supports_images))
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
    runner = web.AppRunner(build_app(gateway, server), handler_cancellation=True, access_log=None,
                           shutdown_timeout=shutdown_timeout_s, keepalive_timeout=server.connections.http_keepalive_s)
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.http_port, ssl_context=ssl_context(server))
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]
