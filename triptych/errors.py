"""Typed exceptions for failed RPCs.

Every `grpc.RpcError` that reaches SDK callers is re-raised as a `TriptychError` subclass chosen
by status code (the original error is the `__cause__`). Codes without a dedicated subclass raise
the base class; `.code` always holds the `grpc.StatusCode`.
"""

from __future__ import annotations

import grpc


class TriptychError(Exception):
    """A failed call. `code` is the gRPC status code, `message` the server's details."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message


class InvalidArgument(TriptychError):
    """Bad request: empty or too-long prompt, bad sampling parameters, unknown session."""


class ResourceExhausted(TriptychError):
    """Server queue is full; retry later."""


class DeadlineExceeded(TriptychError):
    """The call's deadline (`timeout=`) passed before the request finished."""


class Unavailable(TriptychError):
    """Server unreachable or shutting down."""


class Cancelled(TriptychError):
    """The call was cancelled by the server (a client-side cancel just ends the stream)."""


class NotFound(TriptychError):
    """Referenced object (e.g. a session) does not exist."""


class FailedPrecondition(TriptychError):
    """The cluster is not in a state that allows the call (e.g. a role switch that would empty a pool)."""


class Unauthenticated(TriptychError):
    """No API key, or one the server does not know (`Client(api_key=...)` / $TRIPTYCH_API_KEY)."""


class Internal(TriptychError):
    """Server bug or worker failure."""


_BY_CODE: dict[grpc.StatusCode, type[TriptychError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def from_rpc_error(err: grpc.RpcError) -> TriptychError:
    """Map a grpc.RpcError (sync or aio) to the matching TriptychError subclass."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    code = code or grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, TriptychError)(code, details or "")
