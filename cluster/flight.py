"""A Flight: one admitted request as the router tracks it until it ends.

Its state (FlightState) moves along dispatch's path (cluster/dispatch.py has the diagram);
a prefill retried elsewhere or a resume goes back to RESERVING, ENDED is final. It holds at most one lease
on a decode (or colocated) worker, from a successful reservation (or submit) until the request
ends or resumes elsewhere, and at most one on a prefill worker, for the prefill call only
(cluster/pools.py `Lease`); `end()` gives back whatever it still holds. Its `events` queue
carries the decode worker's StepOutputs, or an exception that ends it (Aborted, DecodeDied).

`timings()` is the one place a request's TTFT, TPOT and phase times are computed.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from cluster.pools import Lease, WorkerHandle
from cluster.router_api import ErrorKind, RouterError, Timings


class FlightState(enum.Enum):
    ADMITTED = "admitted"
    WAITING_SLOT = "waiting_slot"
    RESERVING = "reserving"
    ENCODING = "encoding"
    PREFILLING = "prefilling"
    ACTIVATING = "activating"
    SUBMITTING = "submitting"
    DECODING = "decoding"
    RESUMING = "resuming"
    ENDED = "ended"


@dataclass(eq=False)
class Flight:
    """One request in flight. `events` carries StepOutputs, or an Exception that ends it."""

    request_id: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    images: tuple[bytes, ...] = ()  # in prompt order: top-level images, or the messages' in turn
    image_hashes: tuple[bytes, ...] = ()  # their content hashes (prefix caching keys their blocks by them)
    resume: tuple[int, int] | None = None  # re-prefilled: (output tokens in the prompt, chars sent)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)  # abort() before its first token too
    state: FlightState = FlightState.ADMITTED
    resumes: int = 0  # times it was prefilled again after its decode worker died
    decode_lease: Lease | None = None  # the decode (or colocated) worker holding its KV, from reservation to end
    prefill_lease: Lease | None = None  # the prefill worker, for the prefill call only
    cached_tokens: int = 0  # prompt tokens its prefill found in a prefix cache
    prefilled_by: str = ""  # the pool that computed its prompt (metrics: cache hits per pool)
    # Its prompt's block hashes (cache-aware routing), kept with the prompt's length: computed once
    # for the routing decisions of one prefill, again only for a resumed (longer) prompt.
    prefix_hashes: tuple[int, list[bytes]] | None = None

    @property
    def decode(self) -> WorkerHandle | None:
        return self.decode_lease.worker if self.decode_lease else None

    @property
    def prefill(self) -> WorkerHandle | None:
        return self.prefill_lease.worker if self.prefill_lease else None

    def drop_decode(self) -> None:
        if self.decode_lease is not None:
            self.decode_lease.release()
            self.decode_lease = None

    def drop_prefill(self) -> None:
        if self.prefill_lease is not None:
            self.prefill_lease.release()
            self.prefill_lease = None

    def end(self) -> None:
        self.drop_prefill()
        self.drop_decode()
        self.state = FlightState.ENDED


class DecodeDied(RouterError):
    """The worker decoding the request died (before or after its first token)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.UNAVAILABLE, message)


class Aborted(RouterError):
    def __init__(self) -> None:
        super().__init__(ErrorKind.NOT_FOUND, "aborted")


def timings(
    t0: float, end: float, first_at: float | None, last_at: float | None, n: int, phases: dict[str, float]
) -> Timings:
    """The one place TTFT, TPOT and the phase times of a request are computed (0 where a phase
    did not happen; no first token: TTFT, TPOT and decode time are 0)."""
    decode_s = (last_at - first_at) if first_at else 0.0
    return Timings(
        queue_s=phases.get("queue_s", 0.0),
        encode_s=phases.get("encode_s", 0.0),
        prefill_s=phases.get("prefill_s", 0.0),
        transfer_s=phases.get("transfer_s", 0.0),
        decode_s=decode_s,
        ttft_s=(first_at - t0) if first_at else 0.0,
        tpot_s=decode_s / (n - 1) if first_at and n > 1 else 0.0,
        e2e_s=end - t0,
    )
