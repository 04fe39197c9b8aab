"""Resume: a request whose decode worker died goes on elsewhere instead of failing.

With `reprefill_on_decode_failure` on, when the decode (or colocated) worker holding a request
dies (DecodeDied: a failed call, the poller seeing the death, or the health check):

    DECODING ─▶ RESUMING: its lease on the dead worker is dropped, late outputs of the dead
                worker are discarded (an abort among them still ends the request)
             ─▶ the request starts again (cluster/dispatch.py `start`) with prompt + the tokens
                it already streamed as its prompt and the tokens it has left as max_tokens
             ─▶ DECODING on the new worker, which skips the seed's draws of the tokens already
                streamed and decodes text over the whole output (`Flight.resume`), so greedy and
                seeded output are the same as without the failure and a stop string spanning the
                resume point still ends the request.

A request resumes at most max(1, decode workers) times and never once its tokens are all
produced; otherwise the DecodeDied ends it with an error naming the worker.
"""

from __future__ import annotations

import dataclasses
import logging

from cluster.dispatch import Dispatcher
from cluster.flight import Aborted, DecodeDied, Flight, FlightState
from cluster.router_api import GenerateInput

log = logging.getLogger(__name__)


class Resume:
    def __init__(self, dispatcher: Dispatcher, enabled: bool) -> None:
        self.dispatcher = dispatcher
        self.enabled = enabled

    def may_resume(self, request: GenerateInput, flight: Flight, tokens: list[int]) -> bool:
        return (
            self.enabled
            and flight.resumes < max(1, len(self.dispatcher.pools.decode))
            and len(tokens) < request.sampling.max_tokens
        )

    async def after_death(
        self,
        request: GenerateInput,
        flight: Flight,
        ids: list[int],
        tokens: list[int],
        sent_chars: int,
        deadline: float,
        phases: dict[str, float],
        died: DecodeDied,
    ):
        """The request's next output after its decode worker died: the resumed start's output,
        or a DecodeDied (for the caller to raise) when it may not resume (again)."""
        out = died
        while isinstance(out, DecodeDied) and self.may_resume(request, flight, tokens):
            flight.resumes += 1
            try:
                out = await self.dispatcher.unless_aborted(
                    flight, self._restart(request, flight, ids, tokens, sent_chars, deadline, phases)
                )
            except DecodeDied as again:
                out = again
        return out

    async def _restart(self, request, flight, ids, tokens, sent_chars, deadline, phases):
        flight.state = FlightState.RESUMING
        flight.drop_decode()
        while not flight.events.empty():  # outputs of the dead worker that arrived late
            stale = flight.events.get_nowait()
            if isinstance(stale, Aborted):
                raise stale
        log.warning(
            "request %s: decode worker died after %d tokens; prefilling it again", flight.request_id, len(tokens)
        )
        sampling = dataclasses.replace(request.sampling, max_tokens=request.sampling.max_tokens - len(tokens))
        flight.resume = (len(tokens), sent_chars)
        return await self.dispatcher.start(
            dataclasses.replace(request, sampling=sampling), flight, list(ids) + list(tokens), deadline, phases
        )
