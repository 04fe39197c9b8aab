"""The door's caps: cheap checks on a request's size before any expensive work.

Both doors (gRPC, HTTP) parse a request into a GenerateInput; before that input is tokenized,
templated or has its images decoded (on the gateway's admission threads), `check_input` refuses
what exceeds `server.limits` in time linear in the request's structure, never its text. Each
refusal is a RouterError(INVALID_ARGUMENT) whose message names the setting, and whose `reason`
labels it in `triptych_request_errors_total`. `sampling` builds SamplingParams under the same
limits. docs/SECURITY.md lists every limit with its default.
"""

from __future__ import annotations

from cluster.config import LimitsConfig
from cluster.router_api import ErrorKind, GenerateInput, RouterError
from engine.errors import InvalidRequestError
from engine.sequence import SamplingParams


def clip(value: object, n: int = 40) -> str:
    """repr(value), cut to about n characters: user values echoed in errors stay short."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def refused(message: str, reason: str, param: str | None = None) -> RouterError:
    return RouterError(ErrorKind.INVALID_ARGUMENT, message, reason, param)


def check_count(what: str, n: int, limit: int, setting: str, reason: str, stopped: bool = False) -> None:
    """`setting`: the limit's name under server.limits, or a phrase in parentheses. `stopped`:
    counting stopped past the limit, so the refusal says "more than" it."""
    if n > limit:
        where = f"server.limits.{setting}" if setting.isidentifier() else setting
        raise refused(f"{what}: {f'more than {limit}' if stopped else n}; the limit is {limit} ({where})", reason)


def check_id(what: str, value: str, limits: LimitsConfig) -> None:
    """A request or session id: short and printable (it is logged and echoed in headers)."""
    check_count(f"{what} length", len(value), limits.max_id_chars, "max_id_chars", "id_too_long")
    if not value.isprintable():
        raise refused(f"{what} holds control characters", "bad_id")


def text_request_bytes(limits: LimitsConfig) -> int:
    """The largest encoded request without images that can pass the caps: every prompt character
    a 6-byte JSON escape, plus room for the messages' structure. Larger requests to a model that
    takes no images are refused by size alone, before they are parsed."""
    return 6 * limits.max_prompt_chars + 64 * limits.max_messages + (64 << 10)


def request_bytes(limits: LimitsConfig, supports_images: bool) -> int:
    """The largest request body / message the doors read for this model."""
    return limits.max_request_bytes if supports_images else min(limits.max_request_bytes, text_request_bytes(limits))


def max_content_parts(limits: LimitsConfig) -> int:
    """Content parts (text or image) of all messages of one request: a text part and the images
    in each message, and then some."""
    return 4 * limits.max_messages + limits.max_images


def check_size(n: int, limits: LimitsConfig, supports_images: bool, image_bytes: int = 0) -> None:
    """A request's bytes, less its images' (`image_bytes`, as the door found them without parsing
    the request), must fit a request without images: whatever else a request holds is text, which
    the caps bound. This refuses a 15 MB prompt by its size, before parsing it would hold the
    interpreter lock for tens of milliseconds."""
    check_count(
        "request bytes besides images" if supports_images else "request bytes",
        n - image_bytes if supports_images else n,
        text_request_bytes(limits),
        "6 x server.limits.max_prompt_chars + room for max_messages",
        "request_too_large",
    )


def check_prompt_tokens(n: int, max_model_len: int) -> None:
    if n >= max_model_len:
        raise refused(
            f"prompt has {n} tokens; the model's context is {max_model_len} tokens "
            f"(at least one must be left to generate)",
            "prompt_too_long",
        )


def check_input(inp: GenerateInput, limits: LimitsConfig, max_model_len: int) -> None:
    """Refuse a request larger than the limits (its messages are counted before this, at
    parsing, so a million of them never become objects). A client's request id is checked by
    its door (check_id); one the server assigns needs no check."""
    if inp.messages is not None:
        check_count("messages", len(inp.messages), limits.max_messages, "max_messages", "too_many_messages")
        chars = sum(len(m.content) for m in inp.messages)
    else:
        chars = len(inp.prompt or "")
    check_count("prompt characters", chars, limits.max_prompt_chars, "max_prompt_chars", "prompt_too_large")
    if inp.token_ids is not None:
        check_prompt_tokens(len(inp.token_ids), max_model_len)
    if inp.cache_salt:
        check_id("cache_salt", inp.cache_salt, limits)
    images = tuple(inp.images) + tuple(b for m in inp.messages or () for b in m.images)
    check_count("images", len(images), limits.max_images, "max_images", "too_many_images")
    for i, image in enumerate(images):
        check_count(f"image {i} bytes", len(image), limits.max_image_bytes, "max_image_bytes", "image_too_large")


def sampling(
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int = 0,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    ignore_eos: bool = False,
    logprobs: int | None = None,
    max_model_len: int,
    limits: LimitsConfig,
) -> SamplingParams:
    """SamplingParams from API values. Unset / 0 max_tokens means the server's ceiling
    (server.limits.max_tokens, else max_model_len); unset temperature and top_p mean 1.0 (docs/API.md);
    top_k -1 means none; logprobs None means none (else the alternatives per token, 0 to
    MAX_LOGPROBS). Bad values raise RouterError(INVALID_ARGUMENT) naming the field."""
    ceiling = min(limits.max_tokens or max_model_len, max_model_len)
    if max_tokens and max_tokens > ceiling:
        raise refused(
            f"max_tokens {max_tokens} is above the server's limit of {ceiling} "
            f"(server.limits.max_tokens, or the model's context)",
            "max_tokens_above_limit",
            "max_tokens",
        )
    check_count("stop strings", len(stop), limits.max_stop_strings, "max_stop_strings", "too_many_stop_strings")
    for i, s in enumerate(stop):
        check_count(f"stop[{i}] characters", len(s), limits.max_stop_chars, "max_stop_chars", "stop_string_too_long")
    try:
        return SamplingParams(
            max_tokens=max_tokens or ceiling,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=0 if top_k == -1 else top_k,
            seed=seed,
            stop=tuple(stop),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
    except InvalidRequestError as err:
        raise refused(str(err), "bad_sampling", err.field) from None
