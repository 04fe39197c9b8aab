"""asyncio client for the Triptych gRPC API, mirroring `triptych.client.Client`.

    from triptych import AsyncClient

    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="")

`generate` / `chat` are plain methods returning an `AsyncStream` (no await needed before
`async for`); the other calls are coroutines. Stream lifecycle is the sync one: a final chunk
ends it cleanly; `cancel()`, `aclose()`, `async with` exit, cancelling the consuming task, or
dropping the stream cancels the gRPC call, which the server sees as a cancellation.
The channel is created on first use, so build the client inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from protos.triptych.v1 import triptych_pb2 as pb
from protos.triptych.v1 import triptych_pb2_grpc as pb_grpc

from . import _channel, _wire
from .client import DEFAULT_TARGET
from .errors import Unavailable, from_rpc_error
from .types import ClusterStatus, Completion, FinalChunk, ModelInfo, Role, RoleSwitch, TokenChunk

_UNSET: Any = object()


class AsyncStream:
    """Async iterator over one Generate call's chunks."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, request_id: str = "") -> None:
        self._call = call
        self._done = False
        self._cancelled = False
        self.request_id = request_id
        self.final: FinalChunk | None = None

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> TokenChunk | FinalChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            resp = await self._call.read()
        except asyncio.CancelledError:
            if self._cancelled:  # our own cancel() while a read was pending
                raise StopAsyncIteration from None
            self.cancel()  # the consuming task was cancelled: cancel the RPC too
            raise
        except grpc.RpcError as err:
            self._done = True
            if self._cancelled:
                raise StopAsyncIteration from None
            raise from_rpc_error(err) from err
        if resp is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        chunk = _wire.chunk_from_pb(resp)
        self.request_id = chunk.request_id or self.request_id
        if isinstance(chunk, FinalChunk):
            self.final = chunk
            self._done = True
            try:  # read the trailing OK status so the call is not cancelled later
                await self._call.code()
            except (grpc.RpcError, asyncio.CancelledError):
                pass
        return chunk

    def cancel(self) -> None:
        if not self._done:
            self._cancelled = True
            self._done = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncClient:
    """asyncio Triptych client; same methods and arguments as `Client` (api_key, tls and the
    certificates included)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        options: Sequence[tuple[str, Any]] = (),
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
        self._options = _channel.channel_options(options, max_attempts)
        self._wait = wait_for_ready
        self._metadata = _channel.call_metadata(_channel.api_key(api_key))
        self._creds = _channel.credentials(tls, root_certificates, certificate_chain, private_key)
        self._channel: grpc.aio.Channel | None = None
        self._stub_obj: pb_grpc.TriptychStub | None = None

    def _ensure_channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self._creds, options=self._options)
                if self._creds
                else grpc.aio.insecure_channel(self.target, options=self._options)
            )
            self._stub_obj = pb_grpc.TriptychStub(self._channel)
        return self._channel

    @property
    def _stub(self) -> pb_grpc.TriptychStub:
        self._ensure_channel()
        assert self._stub_obj is not None  # set with the channel
        return self._stub_obj

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
    ) -> AsyncStream:
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
        return AsyncStream(
            self._stub.Generate(
                req, timeout=self._deadline(timeout), metadata=self._metadata, wait_for_ready=self._wait
            ),
            req.request_id,
        )

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
    ) -> AsyncStream:
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
        return AsyncStream(
            self._stub.Generate(
                req, timeout=self._deadline(timeout), metadata=self._metadata, wait_for_ready=self._wait
            ),
            req.request_id,
        )

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> Completion:
        stream = self.chat(messages, **kwargs) if messages is not None else self.generate(prompt, **kwargs)
        async with stream:
            return _wire.completion_from_chunks([chunk async for chunk in stream])

    # -- unary calls ----------------------------------------------------------------------

    async def abort(self, request_id: str, *, timeout: float | None = _UNSET) -> bool:
        resp = await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)
        return resp.aborted

    async def model_info(self, *, timeout: float | None = _UNSET) -> ModelInfo:
        resp = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return _wire.model_info_from_pb(resp)

    async def cluster_status(self, *, timeout: float | None = _UNSET) -> ClusterStatus:
        resp = await self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        return _wire.cluster_status_from_pb(resp)

    async def admin_status(self, *, timeout: float | None = _UNSET) -> ClusterStatus:
        """Admin port: the cluster status."""
        stub = pb_grpc.TriptychAdminStub(self._ensure_channel())
        return _wire.cluster_status_from_pb(
            await self._unary(stub.GetClusterStatus, pb.GetClusterStatusRequest(), timeout)
        )

    async def set_worker_role(
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
        stub = pb_grpc.TriptychAdminStub(self._ensure_channel())
        return _wire.role_switch_from_pb((await self._unary(stub.SetWorkerRole, req, timeout)).switch)

    async def _unary(self, method: Any, req: Any, timeout: float | None) -> Any:
        try:
            return await method(
                req, timeout=self._deadline(timeout), metadata=self._metadata, wait_for_ready=self._wait
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is _UNSET else timeout

    # -- lifecycle ------------------------------------------------------------------------

    async def wait_ready(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._ensure_channel().channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout}s") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_obj = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
