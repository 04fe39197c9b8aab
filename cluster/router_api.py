"""The contract between the gateway (gRPC + HTTP doors) and a router (colocated or disaggregated).

A request's life as the gateway sees it:

    gateway ──generate(GenerateInput)──▶ router ──▶ TokenEvent* ──▶ exactly one FinalEvent
                                             │
    gateway ──abort(request_id)─────────────▶┘   (the stream then ends with FinalEvent(ABORT))

Errors raised *before* the first event (bad input, overload) are RouterError subclasses and map to
gRPC status codes / HTTP statuses; errors after the stream started arrive as FinalEvent(ERROR).
Every stream ends: the router enforces `deadline_s` and turns dead workers into FinalEvent(ERROR).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.sequence import FinishReason, SamplingParams, TokenLogprob
from engine.worker_api import Mode, Role, WorkerStatus


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"  # gRPC INVALID_ARGUMENT, HTTP 400
    RESOURCE_EXHAUSTED = "resource_exhausted"  # gRPC RESOURCE_EXHAUSTED, HTTP 429
    UNAVAILABLE = "unavailable"  # gRPC UNAVAILABLE, HTTP 503 (no live worker)
    DEADLINE_EXCEEDED = "deadline_exceeded"  # gRPC DEADLINE_EXCEEDED, HTTP 504
    NOT_FOUND = "not_found"  # gRPC NOT_FOUND, HTTP 404
    FAILED_PRECONDITION = "failed_precondition"  # gRPC FAILED_PRECONDITION, HTTP 409 (admin calls)
    INTERNAL = "internal"  # gRPC INTERNAL, HTTP 500
    UNAUTHENTICATED = "unauthenticated"  # gRPC UNAUTHENTICATED, HTTP 401 (missing or unknown API key)


class RouterError(Exception):
    """A request refused or failed. `message` is for the client (no internal exception text);
    `reason` is a short fixed label for the `triptych_request_errors_total` metric (never user
    text), defaulting to the kind; `param` names the request field at fault, when one is (the
    OpenAI error object's `param`)."""

    def __init__(self, kind: ErrorKind, message: str, reason: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.reason = reason or kind.value
        self.param = param
        self.counted = False  # the gateway counted it in its metrics


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class GenerateInput:
    """Exactly one of prompt / messages / token_ids is set."""

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    images: tuple[bytes, ...] = ()
    deadline_s: float | None = None  # seconds from submission; None: the server's default
    tenant: str = ""  # who sent it (the gateway's principal): decode slots are shared fairly by tenant
    cache_salt: str = ""  # prefix caching: only requests with the same salt share cached KV blocks
    # The choices of one request (OpenAI `n` > 1) carry one id, which the gateway makes (never a
    # client): they go to the same worker and share their prompt's prefill (Router.shares_choices).
    choices_of: str = ""


@dataclass(frozen=True)
class Prepared:
    """What a router's `prepare` made of a request: prompt token ids as the workers see them
    (chat template applied, image tokens expanded) and its images in prompt order, with their
    content hashes (what prefix caching keys their blocks by)."""

    token_ids: tuple[int, ...]
    images: tuple[bytes, ...] = ()
    image_hashes: tuple[bytes, ...] = ()  # each image's content hash (engine/kv_cache.py image_hash)


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for them


@dataclass(frozen=True)
class Timings:
    """Seconds spent in each phase of one request (0 where a phase did not happen)."""

    queue_s: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0


@dataclass(frozen=True)
class FinalEvent:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str  # the whole completion
    timings: Timings = field(default_factory=Timings)
    error: str | None = None  # set iff finish_reason is ERROR: a short message for the client
    error_kind: ErrorKind | None = None  # ... and its kind (a failure before the first token is a status)
    cached_tokens: int = 0  # of prompt_tokens, how many a prefix cache held (not computed)
    prefilled_by: str = ""  # the pool whose worker computed the prompt (prefill, decode, colocated); "": none


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    supports_images: bool


@dataclass(frozen=True)
class RoleSwitch:
    worker_id: str
    from_role: Role
    to_role: Role
    at_unix_s: float
    reason: str  # "manual" or the role policy's signal
    epoch: int = 0  # the worker's epoch after the switch
    drain_s: float = 0.0  # waiting for its requests to end
    switch_s: float = 0.0  # the worker rebuilding itself for the new role


@dataclass(frozen=True)
class ClusterStatus:
    mode: Mode
    workers: tuple[WorkerStatus, ...]
    role_switches: tuple[RoleSwitch, ...] = ()  # the most recent ones, oldest first
    switch_count: int = 0  # role switches since the cluster started
    restarts: tuple[tuple[str, int], ...] = ()  # (worker id, successful restarts), restarted ones only


class Router(abc.ABC):
    """What the gateway needs. Implementation: ClusterRouter (cluster/router.py), colocated or disaggregated."""

    def prepare(self, request: GenerateInput) -> Prepared | None:
        """The expensive part of admission (tokenizing, the chat template, decoding images to
        check them), with no side effect, so the gateway runs it on a worker thread rather than
        its event loop. Raises RouterError for bad input. None: nothing to prepare."""
        return None

    @abc.abstractmethod
    def generate(
        self, request: GenerateInput, prepared: Prepared | None = None
    ) -> AsyncIterator[TokenEvent | FinalEvent]:
        """Validate, then stream. Raises RouterError before the first event on bad input/overload.
        `prepared`: this request's prepare() result (else generate prepares it itself).

        Closing the iterator early (client went away) aborts the request."""

    def shares_choices(self) -> bool:
        """True when the choices of one request (`choices_of`) that start after the first one's
        prefill find its prompt's KV where they are routed: the gateway then starts them so, and
        they compute only the prompt's last block."""
        return False

    @abc.abstractmethod
    async def abort(self, request_id: str) -> bool:
        """True when the request was in flight; its stream then ends with FinalEvent(ABORT)."""

    @abc.abstractmethod
    def model_info(self) -> ModelInfo: ...

    @abc.abstractmethod
    async def cluster_status(self) -> ClusterStatus: ...

    async def set_worker_role(
        self, worker_id: str, role: Role, reason: str = "manual", drain_timeout_s: float = 60.0
    ) -> RoleSwitch:
        """Move a worker to another pool (admin). Routers without role switching refuse."""
        raise RouterError(ErrorKind.FAILED_PRECONDITION, "this deployment does not switch worker roles")

    @abc.abstractmethod
    def count_tokens(self, messages: tuple[ChatMessage, ...]) -> int:
        """Prompt tokens of a chat as the workers see it (template applied, image tokens
        expanded); the gateway trims session history with it. Thread-safe, no side effect."""

    @abc.abstractmethod
    def estimate_tokens(self, message: ChatMessage) -> int:
        """About what one message adds to a chat's tokens (its text and images, without the
        template's markup, so never more than it adds); for trimming history cheaply."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
