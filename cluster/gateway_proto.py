"""Protobuf <-> router types for the gRPC door (`triptych.v1.Triptych`): parsing a serialized
GenerateRequest under the request caps, converting it to a GenerateInput, and the router's
events, cluster status and role switches back to messages; plus the status-code table.

Invariants: parsing refuses (RouterError INVALID_ARGUMENT or RESOURCE_EXHAUSTED, naming the
field or the limit) before building anything whose size a client controls: messages, content
parts and images are counted on a shallow parse first. Conversions hold no state and do no I/O,
so they run on the gateway's admission threads.
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
    caps.check_count(
        "content parts", parts, caps.max_content_parts(limits), "4 x max_messages + max_images", "too_many_parts"
    )
    caps.check_count("images", len(shape.images), limits.max_images, "max_images", "too_many_images")
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError:
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
