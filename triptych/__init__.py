"""Triptych client SDK.

    from triptych import Client
    print(Client("127.0.0.1:50051").complete("Hello", max_tokens=16).text)

Importing this package loads only grpcio and protobuf (no torch, no ray): it is safe to use
from any application. The CLI lives in `triptych.cli` and imports the server side lazily.
"""

from .async_client import AsyncClient, AsyncStream
from .client import Client, Stream
from .errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TriptychError,
    Unauthenticated,
    Unavailable,
)
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

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "Cancelled",
    "Client",
    "ClusterStatus",
    "Completion",
    "DeadlineExceeded",
    "FinalChunk",
    "FinishReason",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "Mode",
    "ModelInfo",
    "NotFound",
    "PoolStatus",
    "ResourceExhausted",
    "Role",
    "RoleSwitch",
    "Stream",
    "Timings",
    "TokenChunk",
    "TokenLogprob",
    "TopLogprob",
    "TriptychError",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "WorkerStatus",
]
