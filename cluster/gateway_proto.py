"""Protobuf <-> router types for the gRPC door (`triptych.v1.Triptych`): parsing a serialized
GenerateRequest under the request caps, converting it to a GenerateInput, and the router's
events, cluster status and role switches back to messages; plus the status-code table.

Invariants: parsing refuses (RouterError INVALID_ARGUMENT or RESOURCE_EXHAUSTED, naming the
field or the limit) before building anything whose size a client controls: messages, content
parts, images and the bytes besides images are counted by walking the wire format first.
Conversions hold no state and do no I/O, so they run on the gateway's admission threads.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from cluster import limits as caps
from cluster.config import LimitsConfig
from cluster.router_api import ChatMessage, ErrorKind, FinalEvent, GenerateInput, RouterError, TokenEvent
from engine.sequence import FinishReason
from engine.worker_api import Role
from protos.triptych.v1 import triptych_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Triptych"].full_name
CHAT_ROLES = ("system", "user", "assistant", "tool")  # "tool": a tool's result, rendered by the chat template

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
ROLE_PB = {
    Role.ENCODE: pb.ROLE_ENCODE,
    Role.PREFILL: pb.ROLE_PREFILL,
    Role.DECODE: pb.ROLE_DECODE,
    Role.COLOCATED: pb.ROLE_COLOCATED,
}
_MODE_PB = {"colocated": pb.MODE_COLOCATED, "disaggregated": pb.MODE_DISAGGREGATED}


class _Malformed(Exception):
    pass


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if i >= end:
            raise _Malformed
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7
    raise _Malformed


def _fields(buf: bytes, start: int, end: int):
    """(field number, start, end) of each field of the message in buf[start:end], in wire order;
    a length-delimited field's bounds are its payload's. Skips payloads by their length: never
    reads or copies them."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        kind = key & 7
        if kind == 0:
            j = _varint(buf, i, end)[1]
        elif kind == 1:
            j = i + 8
        elif kind == 2:
            n, i = _varint(buf, i, end)
            j = i + n
        elif kind == 5:
            j = i + 4
        else:
            raise _Malformed
        if j > end:
            raise _Malformed
        yield key >> 3, i, j
        i = j


def _field(buf: bytes, start: int, end: int, number: int):
    """(start, end) of each occurrence of field `number` in the message in buf[start:end]."""
    return ((i, j) for n, i, j in _fields(buf, start, end) if n == number)


def _check_shape(raw: bytes, limits: LimitsConfig, supports_images: bool) -> None:
    """Count a serialized GenerateRequest's messages, content parts and images, and its bytes
    besides its images', by walking the wire format: payloads are skipped by their length and
    counting stops past each limit, so a 15 MB prompt or a million messages are refused in
    microseconds, before the full parse (which holds the interpreter lock for tens of ms)."""
    counts = {"messages": 0, "content parts": 0, "images": 0}
    limit = {
        "messages": (limits.max_messages, "max_messages", "too_many_messages"),
        "content parts": (caps.max_content_parts(limits), "4 x max_messages + max_images", "too_many_parts"),
        "images": (limits.max_images, "max_images", "too_many_images"),
    }
    image_bytes = 0

    def count(what: str) -> None:
        counts[what] += 1
        caps.check_count(what, counts[what], *limit[what], stopped=True)

    for number, start, end in _fields(raw, 0, len(raw)):
        if number == 5:  # GenerateRequest.images
            count("images")
            image_bytes += end - start
        elif number == 3:  # GenerateRequest.chat
            for m_start, m_end in _field(raw, start, end, 1):  # ChatMessages.messages
                count("messages")
                for p_start, p_end in _field(raw, m_start, m_end, 2):  # ChatMessage.content
                    count("content parts")
                    for i_start, i_end in _field(raw, p_start, p_end, 2):  # ContentPart.image
                        count("images")
                        image_bytes += i_end - i_start
    caps.check_size(len(raw), limits, supports_images, image_bytes)


def parse_request(raw: bytes, limits: LimitsConfig, supports_images: bool = True) -> pb.GenerateRequest:
    """Parse a serialized GenerateRequest, checking its size and counting its messages and images
    first (_check_shape). Raises RouterError(INVALID_ARGUMENT) for too many or for bytes that are
    not a GenerateRequest."""
    try:
        _check_shape(raw, limits, supports_images)
        return pb.GenerateRequest.FromString(raw)
    except (_Malformed, DecodeError):
        raise invalid("the request is not a valid GenerateRequest message") from None


def invalid(message: str, reason: str = "bad_request", param: str | None = None) -> RouterError:
    return RouterError(ErrorKind.INVALID_ARGUMENT, message, reason, param)


def input_from_pb(
    req: pb.GenerateRequest,
    request_id: str,
    max_model_len: int,
    deadline_s: float | None,
    limits: LimitsConfig = LimitsConfig(),
) -> GenerateInput:
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
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        max_model_len=max_model_len,
        limits=limits,
    )
    caps.check_count("images", len(req.images), limits.max_images, "max_images", "too_many_images")
    for i, image in enumerate(req.images):
        if not image.data:
            raise invalid(f"images[{i}].data is empty")
    images = tuple(image.data for image in req.images)
    common = dict(request_id=request_id, sampling=sampling, deadline_s=deadline_s, cache_salt=req.cache_salt)
    if kind == "prompt":
        return GenerateInput(prompt=req.prompt, images=images, **common)
    if kind == "token_ids":
        if not req.token_ids.ids:
            raise invalid("token_ids is empty")
        caps.check_prompt_tokens(len(req.token_ids.ids), max_model_len)  # before a million become a tuple
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
            usage=pb.Usage(
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                cached_tokens=final.cached_tokens,
            ),
            timings=pb.Timings(
                queue_s=t.queue_s,
                encode_s=t.encode_s,
                prefill_s=t.prefill_s,
                transfer_s=t.transfer_s,
                decode_s=t.decode_s,
                ttft_s=t.ttft_s,
                tpot_s=t.tpot_s,
                e2e_s=t.e2e_s,
            ),
            error=(final.error or "unknown error") if final.finish_reason is FinishReason.ERROR else "",
        ),
    )


def status_to_pb(status) -> pb.GetClusterStatusResponse:
    pools = []
    for role in Role:
        workers = [w for w in status.workers if w.role is role]
        if workers:
            pools.append(
                pb.PoolStatus(
                    role=ROLE_PB[role],
                    workers=[
                        pb.WorkerStatus(
                            worker_id=w.worker_id,
                            role=ROLE_PB[w.role],
                            node_id=w.node_id,
                            alive=w.alive,
                            queue_length=w.queue_length,
                            running=w.running,
                            kv_blocks_used=w.kv_blocks_used,
                            kv_blocks_total=w.kv_blocks_total,
                            epoch=w.epoch,
                            kv_blocks_cached=w.kv_blocks_cached,
                        )
                        for w in workers
                    ],
                )
            )
    return pb.GetClusterStatusResponse(
        mode=_MODE_PB.get(status.mode, pb.MODE_UNSPECIFIED),
        pools=pools,
        role_switches=[switch_to_pb(s) for s in status.role_switches],
        role_switch_count=max(status.switch_count, len(status.role_switches)),
        restarts=[pb.WorkerRestarts(worker_id=w, restarts=n) for w, n in status.restarts],
    )


def switch_to_pb(s) -> pb.RoleSwitch:
    return pb.RoleSwitch(
        worker_id=s.worker_id,
        from_role=ROLE_PB[s.from_role],
        to_role=ROLE_PB[s.to_role],
        at_unix_s=s.at_unix_s,
        reason=s.reason,
        epoch=s.epoch,
        drain_s=s.drain_s,
        switch_s=s.switch_s,
    )


def event_to_pb(rid: str, event: TokenEvent | FinalEvent, index: int) -> pb.GenerateResponse:
    if isinstance(event, FinalEvent):
        return final_to_pb(rid, event)
    chunk = pb.TokenChunk(
        text=event.text,
        token_ids=list(event.token_ids),
        index=index,
        logprobs=[
            pb.TokenLogprob(
                token_id=lp.token_id,
                token=lp.token,
                logprob=lp.logprob,
                top=[pb.TopLogprob(token_id=t, token=text, logprob=v) for t, text, v in lp.top],
            )
            for lp in event.logprobs
        ],
    )
    return pb.GenerateResponse(request_id=rid, chunk=chunk)
