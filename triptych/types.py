"""Plain result types of the SDK: what `Client` returns instead of raw protos.

All are frozen dataclasses; enums are `str` enums so they compare equal to their value
(`chunk.finish_reason == "stop"`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # aborted (Abort RPC, server shutdown)
    ERROR = "error"  # failed after generation started; see FinalChunk.error


class Role(str, enum.Enum):
    ENCODE = "encode"
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class Mode(str, enum.Enum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, how many the server's prefix cache held


@dataclass(frozen=True)
class Timings:
    """Server-measured per-request timings, in seconds; 0 for a phase that did not run."""

    queue_s: float = 0.0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (natural log) under the model's own distribution:
    a log-softmax of its raw logits, before temperature, top_k and top_p. `top`: the most likely
    tokens at its position, most likely first (as many as `logprobs=` asked). -9999.0 stands for
    minus infinity."""

    token_id: int
    token: str  # the token's text, decoded alone
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenChunk:
    """Newly generated tokens. `index` is the position of token_ids[0] in the completion.
    `logprobs`: one per token, when the request asked for them (`logprobs=`)."""

    text: str
    token_ids: tuple[int, ...]
    index: int
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    is_final = False


@dataclass(frozen=True)
class FinalChunk:
    """Last item of every stream. `text`/`token_ids` are empty so that loops printing
    `chunk.text` need no special case."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: str = ""
    request_id: str = ""
    text: str = ""
    token_ids: tuple[int, ...] = ()
    is_final = True


Chunk = TokenChunk | FinalChunk


@dataclass(frozen=True)
class Completion:
    """A whole completion, as returned by `Client.complete`."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    error: str = ""
    request_id: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked for them


@dataclass(frozen=True)
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    supports_images: bool


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    role: Role | None
    node_id: str
    alive: bool
    queue_length: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    epoch: int
    kv_blocks_cached: int = 0  # prefix caching: cached blocks no request holds (not in kv_blocks_used)


@dataclass(frozen=True)
class PoolStatus:
    role: Role | None
    workers: tuple[WorkerStatus, ...] = ()


@dataclass(frozen=True)
class RoleSwitch:
    worker_id: str
    from_role: Role | None
    to_role: Role | None
    at_unix_s: float
    reason: str
    epoch: int = 0  # the worker's epoch after the switch
    drain_s: float = 0.0  # waiting for its requests to end
    switch_s: float = 0.0  # rebuilding itself for the new role (no weight reload)

    @property
    def move(self) -> str:
        """The move as text, e.g. `prefill -> decode` (`?` for a role this SDK does not know)."""
        return f"{self.from_role.value if self.from_role else '?'} -> {self.to_role.value if self.to_role else '?'}"


@dataclass(frozen=True)
class ClusterStatus:
    mode: Mode | None
    pools: tuple[PoolStatus, ...] = ()
    role_switches: tuple[RoleSwitch, ...] = field(default=())
    role_switch_count: int = 0  # since the cluster started
    restarts: dict[str, int] = field(default_factory=dict)  # worker id -> successful restarts

    def pool(self, role: Role | str) -> PoolStatus | None:
        """The pool with this role, or None."""
        return next((p for p in self.pools if p.role == role), None)
