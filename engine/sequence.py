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
import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.kv_cache import SHARED, CacheKey


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # failed; the error text travels with it


# Temperatures below this are greedy: dividing logits by a tinier number overflows float32 and
# leaves no distribution to sample from (vLLM uses the same cut).
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0  # far past where sampling is uniform noise; a bound, not a knob
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**64 - 1  # what a seeded generator accepts (uint64 on the wire)
MAX_LOGPROBS = 20  # most alternatives a token's log-probabilities list (OpenAI's top_logprobs ceiling)


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model's own distribution (a log-softmax
    of its raw logits: before temperature, top-k and top-p, so the same whichever way the token
    was picked), with the `top` most likely tokens at its position, most likely first, as
    (token id, text, log-probability). `token` is the token's own text, decoded alone."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. A temperature below GREEDY_TEMPERATURE (0 included) is greedy, and
    top_p / top_k / seed then do nothing.

    Every value is checked here, so a SamplingParams that exists is one the sampler can use:
    each refusal is an InvalidRequestError naming the field and the value."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: no log-probabilities; k in [0, MAX_LOGPROBS]: each generated token's, and the k most
    # likely tokens at its position (TokenLogprob)
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        _number("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequestError(f"top_k must be an integer in [0, {MAX_TOP_K}], got {self.top_k!r}", "top_k")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}", "seed")
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a string or a list of strings", "stop")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty", "stop")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}", "ignore_eos")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidRequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}", "logprobs"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: object, lo: float, hi: float, lo_open: bool = False) -> None:
    """A finite real number in [lo, hi] ((lo, hi] with lo_open); NaN and infinities fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number, got {value!r}", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise InvalidRequestError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}", name)


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
    error: str | None = None  # why it failed (FinishReason.ERROR), for its client
    tenant: str = ""  # who sent it: new prompts are admitted fairly among tenants
    # Prefix caching (engine/kv_cache.py): what its block hashes are keyed by (its cache salt's
    # root and its images' content hashes; None: never cached), the hashes of its cached or
    # registered full blocks, and the prompt tokens its first admission found cached.
    cache_key: CacheKey | None = SHARED
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

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
    error: str | None = None  # set iff finish_reason is ERROR


@dataclass(frozen=True)
class StepOutput:
    """What one engine step produced for one sequence (new tokens since the last step)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    error: str | None = None  # set iff finish_reason is ERROR: what failed, for the client
    cached_tokens: int = 0  # prompt tokens found in the prefix cache (on a sequence's outputs)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per new token, when the request asked for them
