"""Client shares at the gateway: how much of the server one client (principal) may hold.

    enter(principal)      a request counted against its client from the moment a door takes it
                          (before its body is read) until it ends: at most
                          `server.limits.max_requests_per_client` per client, and once the server
                          holds `server.max_queued_requests`, a client at its share of them
                          (max_queued_requests / clients with requests) is refused while a client
                          below its share is still admitted
    off_loop(principal)   expensive admission work (parsing, tokenizing, templating, decoding
                          images) on one of ADMISSION_THREADS threads, at most
                          ADMISSIONS_PER_CLIENT of one client's at once; a place is given back only
                          when its job ends, even if the caller went away

Invariants: a client's count equals its requests inside `enter` blocks; a client with no request
and no admission job has no entry left here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cluster.auth import Principal
from cluster.config import LimitsConfig
from cluster.router_api import ErrorKind, RouterError

ADMISSION_THREADS = 4
ADMISSIONS_PER_CLIENT = 2


class _Entered:
    """A request counted against its client (Gateway.enter); leaving the block uncounts it."""

    def __init__(self, counts: collections.Counter, principal: Principal) -> None:
        self._counts, self._principal = counts, principal

    def __enter__(self) -> _Entered:
        return self

    def __exit__(self, *exc: object) -> None:
        self._counts[self._principal] -= 1
        if self._counts[self._principal] <= 0:
            del self._counts[self._principal]


@dataclass
class _Slot:
    """A principal's share of the admission threads, while it has requests being prepared."""

    semaphore: asyncio.Semaphore
    users: int = 0


class ClientShares:
    def __init__(self, limits: LimitsConfig, max_queued_requests: int) -> None:
        self.limits = limits
        self.max_queued = max_queued_requests  # in flight in the whole server
        self._per_client: collections.Counter[Principal] = collections.Counter()
        self._admission = ThreadPoolExecutor(ADMISSION_THREADS, thread_name_prefix="admission")
        self._admitting: dict[Principal, _Slot] = {}

    def admitting(self) -> int:
        """Clients with admission jobs running or waiting."""
        return len(self._admitting)

    def enter(self, principal: Principal) -> contextlib.AbstractContextManager:
        """Count a request against its client from the moment its door takes it (before its body
        is read or parsed) until it ends. Raises RouterError (RESOURCE_EXHAUSTED) when the client has
        `max_requests_per_client`, or when the server has `max_queued_requests` and this client
        already holds its share of them (max_queued_requests / clients with requests): a client
        below its share is still admitted, so a few heavy clients cannot lock the others out."""
        held, limit = self._per_client[principal], self.limits.max_requests_per_client
        if held >= limit:
            raise RouterError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"this client has {held} requests in flight (limit "
                f"server.limits.max_requests_per_client = {limit}); retry later",
                "client_busy",
            )
        total, clients = sum(self._per_client.values()), len(self._per_client) + (held == 0)
        if total >= self.max_queued and held >= max(1, self.max_queued // clients):
            raise RouterError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"the server has {total} requests in flight (limit "
                f"server.max_queued_requests = {self.max_queued}) and this client holds its share of them; retry later",
                "server_busy",
            )
        self._per_client[principal] += 1  # checked and counted now; the caller enters at once
        return _Entered(self._per_client, principal)

    async def off_loop(self, principal: Principal, fn, *args):
        """Run `fn(*args)` (parsing, tokenizing, decoding) on an admission thread: the event loop
        only moves bytes. At most ADMISSIONS_PER_CLIENT of one principal's run at once."""
        slot = self._admitting.get(principal)
        if slot is None:
            slot = self._admitting[principal] = _Slot(asyncio.Semaphore(ADMISSIONS_PER_CLIENT))
        slot.users += 1

        def leave(_=None) -> None:
            slot.users -= 1
            if slot.users == 0:  # nobody holds or waits for it: forget it
                del self._admitting[principal]

        try:
            await slot.semaphore.acquire()
        except BaseException:
            leave()
            raise

        def done(_) -> None:
            slot.semaphore.release()
            leave()

        # A job on a thread cannot be stopped: if the caller goes away (a client that sends heavy
        # requests and disconnects), the place is given back only when the job ends, so one client
        # never has more than its share of the threads busy.
        job = asyncio.get_running_loop().run_in_executor(self._admission, fn, *args)
        job.add_done_callback(done)
        return await asyncio.shield(job)

    def close(self) -> None:
        self._admission.shutdown(wait=False, cancel_futures=True)
