"""Request and sequence state.

A sequence's life (colocated engine; prefill/decode workers use the same states):

    WAITING ──schedule──▶ RUNNING ──last token / stop / EOS / max_tokens──▶ FINISHED
       ▲                    │
       └────preempted───────┘   (blocks freed; recomputed from token 0 when rescheduled)
    any state ──abort──▶ FINISHED (reason ABORT)

Token bookkeeping: `token_ids` = prompt + generated so far. `num_computed_tokens` counts the
tokens whose K/V are in the cache. A forward computes token_ids[num_computed : num_computed + n];
when that reaches the end of token_ids, the logits of the last position give the next token.
So decode is simply a step with n == 1, and a preempted sequence re-prefills prompt + output.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"          # EOS token or a stop string
    LENGTH = "length"      # max_tokens or the model's context reached
    ABORT = "abort"        # cancelled by the caller
    ERROR = "error"        # failed; the error text travels with it


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (top_p/top_k/seed then do nothing)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0          # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Sequence:
    """One generation's mutable state, owned by exactly one scheduler at a time."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    output_text: str = ""
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason


@dataclass(frozen=True)
class RequestOutput:
    """What the offline API returns per prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one sequence (new tokens since the last step)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
