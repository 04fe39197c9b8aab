"""Blocking client for the Triptych gRPC API.

    from triptych import Client

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
        print(chunk.finish_reason, chunk.usage, chunk.timings)

A stream yields `TokenChunk`s and ends with one `FinalChunk`. Stream lifecycle:

    open ──next()──▶ open ──FinalChunk──▶ finished (status drained, nothing to cancel)
      │                │
      └──── cancel() / close() / with-exit / garbage collection ──▶ cancelled
                        (the gRPC call is cancelled; the server sees CANCELLED and aborts)

Breaking out of `for chunk in client.generate(...)` drops the only reference to the stream,
which cancels it; keep a reference (or use `with`) to control it explicitly. Failed calls raise
`triptych.errors.TriptychError` subclasses; a stream cancelled by this client just ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

from . import _channel, _wire
from .errors import Unavailable, from_rpc_error
from .types import ClusterStatus, Completion, FinalChunk, ModelInfo, Role, RoleSwitch, TokenChunk

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_ADMIN_TARGET = "127.0.0.1:50052"
_UNSET: Any = object()  # "use the client's default timeout"


class Stream:
    """Iterator over one Generate call's chunks; see the module docstring for its lifecycle."""

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc's _MultiThreadedRendezvous: an iterator and a grpc.Future
        self._done = False
        self._cancelled = False
        self.request_id = ""  # known once the first chunk arrived (or if the caller chose it)
        self.final: FinalChunk | None = None

    def __iter__(self) -> Iterator[TokenChunk | FinalChunk]:
        return self

    def __next__(self) -> TokenChunk | FinalChunk:
        if self._done:
            raise StopIteration
        try:
            resp = next(self._call)
        except StopIteration:
            self._done = True
            raise
        except grpc.RpcError as err:
            self._done = True
            if self._cancelled:
                raise StopIteration from None
            raise from_rpc_error(err) from err
        chunk = _wire.chunk_from_pb(resp)
        self.request_id = chunk.request_id or self.request_id
        if isinstance(chunk, FinalChunk):
            self.final = chunk
            self._drain()
        return chunk

    def _drain(self) -> None:
        """Read the OK status that follows the final chunk, so the call ends cleanly rather
        than being cancelled when this object is dropped."""
        self._done = True
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass  # the final chunk already settled the request

    def cancel(self) -> None:
        """Cancel the call if it is still running; the iterator then ends."""
        if not self._done:
            self._cancelled = True
            self._done = True
            self._call.cancel()

    close = cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        if getattr(self, "_call", None) is not None:
            self.cancel()


class Client:
    """Blocking Triptych client. `timeout` is the default deadline (seconds) for every call;
    each method's `timeout=` overrides it (None: no deadline).

    api_key: sent as `authorization: Bearer <key>` with every call (default: $TRIPTYCH_API_KEY;
    on the admin port, an admin key). tls / root_certificates / certificate_chain / private_key:
    a TLS channel (PEM bytes or file paths; any of them implies TLS; no root_certificates: the
    system's roots; a certificate chain + key for servers that require client certificates).
    max_attempts: tries of an idempotent call (model_info, cluster_status, admin_status, abort)
    that the server answers UNAVAILABLE, with backoff (1: no retry; Generate is never retried).
    wait_for_ready: calls made while the server is unreachable wait for it (up to their
    deadline) instead of failing at once with UNAVAILABLE."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: _channel.Pem | None = None,
        certificate_chain: _channel.Pem | None = None,
        private_key: _channel.Pem | None = None,
        max_attempts: int = _channel.MAX_ATTEMPTS,
        wait_for_ready: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = _channel.call_metadata(_channel.api_key(api_key))
        self._wait = wait_for_ready
        self._owns_channel = channel is None
        if channel is None:
            creds = _channel.credentials(tls, root_certificates, certificate_chain, private_key)
            opts = _channel.channel_options(options, max_attempts)
            channel = grpc.secure_channel(target, creds, options=opts) if creds else grpc.insecure_channel(target, opts)
        self._channel = channel
        self._stub = pb_grpc.TriptychStub(self._channel)
        self._admin = pb_grpc.TriptychAdminStub(self._channel)

    # -- generation -----------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        images: Sequence[_wire.ImageLike] | None = None,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        ignore_eos: bool = False,
        logprobs: int | None = None,
        session_id: str | None = None,
        cache_salt: str | None = None,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
    ) -> Stream:
        """Stream a completion of a raw text prompt (no chat template) or of token ids."""
        req = _wire.generate_request(
            prompt=prompt,
            token_ids=token_ids,
            images=images,
            session_id=session_id,
            cache_salt=cache_salt,
            request_id=request_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        return self._stream(req, timeout)

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Iterable[str] | None = None,
        ignore_eos: bool = False,
        logprobs: int | None = None,
        session_id: str | None = None,
        cache_salt: str | None = None,
        request_id: str | None = None,
        timeout: float | None = _UNSET,
    ) -> Stream:
        """Stream a chat reply. `messages` is [{"role": ..., "content": str | [parts]}]; a part
        is a str, image bytes, {"type": "text", "text": ...} or {"type": "image", "image": bytes}.
        With `session_id`, the server prepends the session's earlier turns. With `cache_salt`, only
        requests with the same salt share the server's cached prompt prefixes. With `logprobs=k`
        (0 to 20), every chunk carries each token's log-probability and the k most likely tokens
        at its position (`TokenChunk.logprobs`)."""
        req = _wire.generate_request(
            messages=messages,
            session_id=session_id,
            cache_salt=cache_salt,
            request_id=request_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            logprobs=logprobs,
        )
        return self._stream(req, timeout)

    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Completion:
        """Run a whole generation (chat if `messages` is given) and return it in one piece.
        Takes the keyword arguments of `generate` / `chat`. A request that fails after it
        started returns finish_reason ERROR with `.error` set rather than raising."""
        stream = self.chat(messages, **kwargs) if messages is not None else self.generate(prompt, **kwargs)
        with stream:
            return _wire.completion_from_chunks(stream)

    def _stream(self, req: pb.GenerateRequest, timeout: float | None) -> Stream:
        call = self._stub.Generate(
            req, timeout=self._deadline(timeout), metadata=self._metadata, wait_for_ready=self._wait
        )
        stream = Stream(call)
        stream.request_id = req.request_id
        return stream

    # -- unary calls ----------------------------------------------------------------------

    def abort(self, request_id: str, *, timeout: float | None = _UNSET) -> bool:
        """Abort an in-flight request; False if the server knows no such in-flight request."""
        return self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout).aborted

    def model_info(self, *, timeout: float | None = _UNSET) -> ModelInfo:
        return _wire.model_info_from_pb(self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def cluster_status(self, *, timeout: float | None = _UNSET) -> ClusterStatus:
        resp = self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        return _wire.cluster_status_from_pb(resp)

    def admin_status(self, *, timeout: float | None = _UNSET) -> ClusterStatus:
        """Admin port: the cluster status (the same as cluster_status on the serving port)."""
        resp = self._unary(self._admin.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        return _wire.cluster_status_from_pb(resp)

    def set_worker_role(
        self,
        worker_id: str,
        role: Role | str,
        *,
        drain_timeout_s: float = 60.0,
        reason: str = "manual",
        timeout: float | None = _UNSET,
    ) -> RoleSwitch:
        """Admin port: move a worker to the prefill or decode pool, or between encode and prefill
        (drains it first); the switch record."""
        req = _wire.set_role_request(worker_id, role, drain_timeout_s, reason)
        return _wire.role_switch_from_pb(self._unary(self._admin.SetWorkerRole, req, timeout).switch)

    def _unary(self, method: Any, req: Any, timeout: float | None) -> Any:
        try:
            return method(req, timeout=self._deadline(timeout), metadata=self._metadata, wait_for_ready=self._wait)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    # -- lifecycle ------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects; raise Unavailable after `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout}s") from None

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
