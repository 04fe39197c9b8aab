"""OpenAI request parsing for the HTTP door: a request body (bytes) -> the router's input fields
and sampling parameters, for /v1/chat/completions and /v1/completions.

Invariants: every refusal is a RouterError (INVALID_ARGUMENT naming the field at fault, e.g.
`messages[2].content[0].image_url`, RESOURCE_EXHAUSTED naming the limit, NOT_FOUND for an
unknown model); a body is measured (size, JSON values counted by their separators) before it is
parsed, and an image is measured before it is decoded, so no client-sized work precedes the
caps of cluster/limits.py. Parsing is pure (no I/O), so it runs on the gateway's admission
threads. Only `data:` image URLs are accepted: the server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from typing import Any

from cluster import limits as caps
from cluster.config import LimitsConfig
from cluster.gateway_proto import CHAT_ROLES, invalid
from cluster.router_api import ChatMessage, ErrorKind, ModelInfo, RouterError
from engine.sequence import MAX_LOGPROBS

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[^;,]*)*;base64,(?P<data>.*)", re.DOTALL)


def json_field(body: dict, name: str, types: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    """body[name] when it is one of `types` in JSON's sense (a boolean is not a number); `default`
    when absent or null; otherwise INVALID_ARGUMENT naming the field and saying `what` it must be."""
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but not a number in JSON terms.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise invalid(f"'{name}' must be {what}, got a boolean", param=name)
    if not isinstance(value, types):
        raise invalid(f"'{name}' must be {what}, got {json_kind(value)}", param=name)
    return value


def json_kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
    }.get(type(value), type(value).__name__)


def parse_n(body: dict, limits: LimitsConfig) -> int:
    """The choices asked for (`n`): each is generated as a request of its own (with `seed`, choice
    i draws from seed + i), at most server.limits.max_choices."""
    n = json_field(body, "n", int, "an integer", 1)
    if isinstance(n, bool) or not 1 <= n <= limits.max_choices:
        raise invalid(
            f"'n' must be in [1, {limits.max_choices}] (server.limits.max_choices), got {caps.clip(n)}", param="n"
        )
    return n


def _logprobs(body: dict, chat: bool) -> int | None:
    """SamplingParams.logprobs of a request: chat asks with `logprobs: true` and `top_logprobs: k`
    (k needs logprobs on), a completion with `logprobs: k`; k in [0, MAX_LOGPROBS]."""
    if chat:
        on = json_field(body, "logprobs", bool, "a boolean", False)
        top = json_field(body, "top_logprobs", int, "an integer")
        if top is not None and not on:
            raise invalid("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        name, k = "top_logprobs", (top or 0) if on else None
    else:
        if body.get("top_logprobs") is not None:
            raise invalid("'top_logprobs' is a chat field; completions take 'logprobs': k", param="top_logprobs")
        name, k = "logprobs", json_field(body, "logprobs", int, "an integer")
    if k is not None and (isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
        raise invalid(f"'{name}' must be in [0, {MAX_LOGPROBS}], got {caps.clip(k)}", param=name)
    return k


def _sampling(body: dict, max_model_len: int, limits: LimitsConfig, chat: bool) -> Any:
    parse_n(body, limits)
    best_of = json_field(body, "best_of", int, "an integer", 1)
    if best_of != 1:
        raise invalid(f"'best_of' must be 1, got {caps.clip(best_of)}", param="best_of")
    logprobs = _logprobs(body, chat)
    for name in ("echo", "tools", "functions", "logit_bias", "suffix"):
        if body.get(name):
            raise invalid(f"'{name}' is not supported by this server", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if json_field(body, name, (int, float), "a number", 0):
            raise invalid(f"'{name}' is not supported by this server (must be 0)", param=name)
    fmt = json_field(body, "response_format", dict, "an object")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise invalid(
            f"'response_format' type {caps.clip(fmt.get('type'))} is not supported (only 'text')",
            param="response_format",
        )
    json_field(body, "user", str, "a string")
    max_tokens = json_field(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = json_field(body, "max_tokens", int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"'max_tokens' must be >= 1, got {caps.clip(max_tokens)}", param="max_tokens")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list):
        caps.check_count(
            "stop strings", len(stop), limits.max_stop_strings, "max_stop_strings", "too_many_stop_strings"
        )
        if not all(isinstance(s, str) for s in stop):
            raise invalid("'stop' must be a string or an array of strings", param="stop")
        stops = tuple(stop)
    else:
        raise invalid(f"'stop' must be a string or an array of strings, got {json_kind(stop)}", param="stop")
    top_k = json_field(body, "top_k", int, "an integer", 0)
    if top_k < -1:
        raise invalid(f"'top_k' must be >= -1, got {caps.clip(top_k)}", param="top_k")
    return caps.sampling(
        max_tokens=max_tokens,
        temperature=json_field(body, "temperature", (int, float), "a number"),
        top_p=json_field(body, "top_p", (int, float), "a number"),
        top_k=top_k,
        seed=json_field(body, "seed", int, "an integer"),
        stop=stops,
        ignore_eos=json_field(body, "ignore_eos", bool, "a boolean", False),
        logprobs=logprobs,
        max_model_len=max_model_len,
        limits=limits,
    )


def parse_messages(messages: Any, limits: LimitsConfig = LimitsConfig()) -> tuple[ChatMessage, ...]:
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of {role, content} objects", param="messages")
    caps.check_count("messages", len(messages), limits.max_messages, "max_messages", "too_many_messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise invalid(f"{where} must be an object, got {json_kind(msg)}", param=where)
        role = msg.get("role")
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise invalid(
                f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {caps.clip(role)}", param=f"{where}.role"
            )
        content = msg.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append(ChatMessage(role=role, content=content))
            continue
        if not isinstance(content, list):
            raise invalid(
                f"{where}.content must be a string or an array of parts, got {json_kind(content)}",
                param=f"{where}.content",
            )
        texts: list[str] = []
        images: list[bytes] = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                caps.check_count(
                    "images in a message", len(images) + 1, limits.max_images, "max_images", "too_many_images"
                )
                images.append(_image(part.get("image_url"), pwhere, limits))
            else:
                raise invalid(
                    f"{pwhere} must be {{'type': 'text', 'text': ...}} or "
                    f"{{'type': 'image_url', 'image_url': {{'url': 'data:...'}}}}",
                    param=pwhere,
                )
        out.append(ChatMessage(role=role, content="".join(texts), images=tuple(images)))
    return tuple(out)


def _image(image_url: Any, where: str, limits: LimitsConfig) -> bytes:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise invalid(f"{where}.image_url must be {{'url': 'data:image/...;base64,...'}}", param=f"{where}.image_url")
    if not url.startswith("data:"):
        raise invalid(
            f"{where}.image_url: only data: URLs (data:image/png;base64,...) are accepted; "
            f"this server does not fetch {caps.clip(url)}",
            param=f"{where}.image_url",
        )
    # base64 holds 3 bytes per 4 characters: refuse an oversized image before decoding it.
    caps.check_count(
        f"{where} image bytes", len(url) * 3 // 4 - 64, limits.max_image_bytes, "max_image_bytes", "image_too_large"
    )
    m = _DATA_URI.fullmatch(url)
    if m is None:
        raise invalid(
            f"{where}.image_url: not a base64 data URL (expected data:image/png;base64,...)", param=f"{where}.image_url"
        )
    try:
        data = base64.b64decode(m.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{where}.image_url: invalid base64 image data", param=f"{where}.image_url") from None
    if not data:
        raise invalid(f"{where}.image_url: the image is empty", param=f"{where}.image_url")
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
        raise invalid(f"'prompt' holds {len(prompt)} prompts; send one prompt per request", param="prompt")
    raise invalid("'prompt' must be a string or a non-empty array of token ids", param="prompt")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def json_items_limit(limits: LimitsConfig) -> int:
    """How many JSON values (counted by their separators) a request may hold: every character of
    the prompt a separate token id, and room for the messages' structure."""
    return limits.max_prompt_chars + 16 * limits.max_messages + 1024


def data_url_bytes(raw: bytes, limits: LimitsConfig) -> int:
    """Bytes of a raw JSON body's data URLs (each string that starts with `data:`, up to its
    closing quote), found with bytes.find, without parsing: the image data check_size leaves out
    of the body's size. Counts at most max_images of them, each at most the base64 of the largest
    image (longer ones stay in the size, as text); parsing refuses them by their own checks."""
    total, longest = 0, limits.max_image_bytes * 4 // 3 + 256
    i = raw.find(b'"data:')
    for _ in range(limits.max_images):
        end = raw.find(b'"', i + 1) if i >= 0 else -1
        if end < 0:
            break
        total += end - i if end - i <= longest else 0
        i = raw.find(b'"data:', end + 1)
    return total


def parse_body(raw: bytes, limits: LimitsConfig = LimitsConfig(), supports_images: bool = True) -> dict:
    """The request body as a JSON object; INVALID_ARGUMENT for anything else (NaN and Infinity,
    which Python's json accepts, included). Parsing holds the interpreter lock, so a body larger
    than any acceptable request to this model (by its bytes besides its data URLs), or with more
    values than any (300k messages), is refused first by its size and by counting separators,
    which costs a fraction of parsing it."""
    caps.check_size(len(raw), limits, supports_images, data_url_bytes(raw, limits) if supports_images else 0)
    items = raw.count(b",") + raw.count(b"{")
    caps.check_count(
        "JSON values in the body",
        items,
        json_items_limit(limits),
        "max_messages and max_prompt_chars",
        "too_many_items",
    )
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise invalid(f"request body is not valid JSON: {err.msg if hasattr(err, 'msg') else 'bad UTF-8'}") from None
    except (ValueError, RecursionError) as err:  # NaN / Infinity, a 5000-digit number, 100k nested arrays
        what = str(err) if "JSON number" in str(err) else "too deeply nested or a number too long"
        raise invalid(f"request body is not valid JSON: {what}") from None
    if not isinstance(body, dict):
        raise invalid(f"request body must be a JSON object, got {json_kind(body)}")
    return body


log = logging.getLogger(__name__)

# The body fields this server reads (the others are ignored, and said so once each at debug level).
USED_FIELDS = frozenset(
    "model messages prompt cache_salt stream stream_options n best_of logprobs top_logprobs echo tools "
    "functions logit_bias suffix presence_penalty frequency_penalty response_format user "
    "max_completion_tokens max_tokens stop top_k temperature top_p seed ignore_eos".split()
)
_MAX_IGNORED_NAMES = 256  # a client sending a million field names must not grow this set
_ignored_logged: set[str] = set()


def note_ignored_fields(body: dict) -> None:
    """Log each body field this server ignores, once per field name (debug level)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    for name in body.keys() - USED_FIELDS:
        if len(_ignored_logged) >= _MAX_IGNORED_NAMES:
            return
        shown = caps.clip(name)
        if shown not in _ignored_logged:
            _ignored_logged.add(shown)
            log.debug("ignoring OpenAI request field %s: this server does not use it", shown)


def parse_chunks(chunks: list[bytes], chat: bool, info: ModelInfo, limits: LimitsConfig) -> tuple[dict, dict, Any]:
    """parse_request of a body read as chunks; joining them (a copy that does not hold the
    interpreter lock past 1 MB) runs here, off the event loop."""
    return parse_request(b"".join(chunks), chat, info, limits)


def parse_request(raw: bytes, chat: bool, info: ModelInfo, limits: LimitsConfig) -> tuple[dict, dict, Any]:
    """(body, input fields, sampling) of a completion request; runs off the event loop."""
    model, max_model_len = info.name, info.max_model_len
    body = parse_body(raw, limits, info.supports_images)
    note_ignored_fields(body)
    name = json_field(body, "model", str, "a string", model)
    if name != model:
        raise RouterError(
            ErrorKind.NOT_FOUND,
            f"model {caps.clip(name)} does not exist; this server serves {model!r}",
            "unknown_model",
        )
    inp = {"messages": parse_messages(body.get("messages"), limits)} if chat else _prompt(body)
    inp["cache_salt"] = json_field(body, "cache_salt", str, "a string", "")  # checked with the input's limits
    return body, inp, _sampling(body, max_model_len, limits, chat)
