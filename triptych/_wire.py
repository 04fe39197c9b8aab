"""Conversions between SDK arguments / result types and the triptych.v1 protos.

Shared by the sync and async clients; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from protos.triptych.v1 import triptych_pb2 as pb

from .types import (
    ClusterStatus,
    Completion,
    FinalChunk,
    FinishReason,
    Mode,
    ModelInfo,
    PoolStatus,
    Role,
    RoleSwitch,
    Timings,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    Usage,
    WorkerStatus,
)

# An image argument: the encoded file's bytes (type sniffed) or (bytes, mime_type).
ImageLike = Union[bytes, bytearray, memoryview, tuple[bytes, str]]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

_FINISH = {
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_ABORT: FinishReason.ABORT,
    pb.FINISH_REASON_ERROR: FinishReason.ERROR,
}
_ROLE = {
    pb.ROLE_ENCODE: Role.ENCODE,
    pb.ROLE_PREFILL: Role.PREFILL,
    pb.ROLE_DECODE: Role.DECODE,
    pb.ROLE_COLOCATED: Role.COLOCATED,
}
_MODE = {pb.MODE_COLOCATED: Mode.COLOCATED, pb.MODE_DISAGGREGATED: Mode.DISAGGREGATED}


def sniff_mime(data: bytes) -> str:
    """MIME type from magic bytes; "" when unknown (the server sniffs again)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return ""


def image_pb(image: ImageLike) -> pb.Image:
    if isinstance(image, tuple):
        data, mime = image
        return pb.Image(data=bytes(data), mime_type=mime)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return pb.Image(data=data, mime_type=sniff_mime(data))
    raise TypeError(f"an image must be bytes or (bytes, mime_type), got {type(image).__name__}")


def _content_part_pb(part: Any) -> pb.ContentPart:
    if isinstance(part, str):
        return pb.ContentPart(text=part)
    if isinstance(part, (bytes, bytearray, memoryview, tuple)):
        return pb.ContentPart(image=image_pb(part))
    if isinstance(part, Mapping):
        kind = part.get("type")
        if kind == "text":
            return pb.ContentPart(text=str(part["text"]))
        if kind == "image":
            data = part.get("image", part.get("data"))
            mime = part.get("mime_type")
            return pb.ContentPart(image=image_pb((data, mime) if mime else data))
        raise ValueError(f"content part type must be 'text' or 'image', got {kind!r}")
    raise TypeError(f"unsupported content part {type(part).__name__}")


def chat_pb(messages: Sequence[Mapping[str, Any]]) -> pb.ChatMessages:
    """[{"role": ..., "content": str | [parts]}] -> ChatMessages.

    A part is a str, image bytes, {"type": "text", "text": ...} or
    {"type": "image", "image": bytes, "mime_type": optional str}.
    """
    if isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        content = msg["content"]
        parts = [content] if isinstance(content, (str, bytes)) else list(content)
        out.append(pb.ChatMessage(role=str(msg["role"]), content=[_content_part_pb(p) for p in parts]))
    return pb.ChatMessages(messages=out)


def sampling_pb(
    max_tokens: int = 0,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Iterable[str] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
) -> pb.SamplingParams:
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    params = pb.SamplingParams(max_tokens=max_tokens, top_k=top_k, stop=stops, ignore_eos=ignore_eos)
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    if seed is not None:
        params.seed = seed
    if logprobs is not None:
        if logprobs < 0:  # the server says the upper limit (INVALID_ARGUMENT)
            raise ValueError(f"logprobs must be >= 0, got {logprobs}")
        params.logprobs = logprobs
    return params


def generate_request(
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    token_ids: Sequence[int] | None = None,
    images: Sequence[ImageLike] | None = None,
    session_id: str | None = None,
    request_id: str | None = None,
    cache_salt: str | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """Build a GenerateRequest; exactly one of prompt / messages / token_ids must be given."""
    given = [
        name for name, v in (("prompt", prompt), ("messages", messages), ("token_ids", token_ids)) if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"pass exactly one of prompt, messages, token_ids (got {given or 'none'})")
    if images and messages is not None:
        raise ValueError("chat input carries images inside messages; do not pass images=")
    req = pb.GenerateRequest(
        request_id=request_id or "",
        session_id=session_id or "",
        cache_salt=cache_salt or "",
        images=[image_pb(im) for im in images or ()],
        sampling=sampling_pb(**sampling),
    )
    if prompt is not None:
        req.prompt = prompt
    elif messages is not None:
        req.chat.CopyFrom(chat_pb(messages))
    else:
        req.token_ids.ids.extend(int(t) for t in token_ids or ())
    return req


def chunk_from_pb(resp: pb.GenerateResponse) -> TokenChunk | FinalChunk:
    if resp.WhichOneof("kind") == "final":
        f = resp.final
        return FinalChunk(
            finish_reason=_FINISH.get(f.finish_reason, FinishReason.ERROR),
            usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens, f.usage.cached_tokens),
            timings=Timings(**{name: getattr(f.timings, name) for name in Timings.__dataclass_fields__}),
            error=f.error,
            request_id=resp.request_id,
        )
    c = resp.chunk
    logprobs = tuple(
        TokenLogprob(
            lp.token_id, lp.token, lp.logprob, tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in lp.top)
        )
        for lp in c.logprobs
    )
    return TokenChunk(
        text=c.text, token_ids=tuple(c.token_ids), index=c.index, request_id=resp.request_id, logprobs=logprobs
    )


def completion_from_chunks(chunks: Iterable[TokenChunk | FinalChunk]) -> Completion:
    """Fold a finished stream (its last item a FinalChunk) into one Completion."""
    texts: list[str] = []
    ids: list[int] = []
    logprobs: list[TokenLogprob] = []
    final = None
    for chunk in chunks:
        if isinstance(chunk, FinalChunk):
            final = chunk
        else:
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
    if final is None:  # the stream was cancelled locally before the final chunk
        raise RuntimeError("stream ended without a final chunk")
    return Completion(
        text="".join(texts),
        token_ids=tuple(ids),
        finish_reason=final.finish_reason,
        usage=final.usage,
        timings=final.timings,
        error=final.error,
        request_id=final.request_id,
        logprobs=tuple(logprobs),
    )


def model_info_from_pb(r: pb.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model=r.model,
        max_model_len=r.max_model_len,
        vocab_size=r.vocab_size,
        eos_token_ids=tuple(r.eos_token_ids),
        dtype=r.dtype,
        supports_images=r.supports_images,
    )


def cluster_status_from_pb(r: pb.GetClusterStatusResponse) -> ClusterStatus:
    def worker(w: pb.WorkerStatus) -> WorkerStatus:
        return WorkerStatus(
            worker_id=w.worker_id,
            role=_ROLE.get(w.role),
            node_id=w.node_id,
            alive=w.alive,
            queue_length=w.queue_length,
            running=w.running,
            kv_blocks_used=w.kv_blocks_used,
            kv_blocks_total=w.kv_blocks_total,
            epoch=w.epoch,
            kv_blocks_cached=w.kv_blocks_cached,
        )

    return ClusterStatus(
        mode=_MODE.get(r.mode),
        pools=tuple(PoolStatus(_ROLE.get(p.role), tuple(worker(w) for w in p.workers)) for p in r.pools),
        role_switches=tuple(role_switch_from_pb(s) for s in r.role_switches),
        role_switch_count=r.role_switch_count,
        restarts={w.worker_id: w.restarts for w in r.restarts},
    )


def role_switch_from_pb(s: pb.RoleSwitch) -> RoleSwitch:
    return RoleSwitch(
        s.worker_id, _ROLE.get(s.from_role), _ROLE.get(s.to_role), s.at_unix_s, s.reason, s.epoch, s.drain_s, s.switch_s
    )


def set_role_request(worker_id: str, role: Role | str, drain_timeout_s: float, reason: str) -> pb.SetWorkerRoleRequest:
    role = Role(role)
    if role not in (Role.ENCODE, Role.PREFILL, Role.DECODE):
        raise ValueError(f"a worker can switch to encode, prefill or decode, not {role.value}")
    code = {Role.ENCODE: pb.ROLE_ENCODE, Role.PREFILL: pb.ROLE_PREFILL, Role.DECODE: pb.ROLE_DECODE}[role]
    return pb.SetWorkerRoleRequest(worker_id=worker_id, role=code, drain_timeout_s=drain_timeout_s, reason=reason)
