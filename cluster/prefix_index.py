"""Cache-aware routing: the router's index of which worker's prefix cache holds a prompt's blocks.

With `engine.prefix_caching` on, a worker computes only the part of a prompt its cache lacks, so
where a request goes decides how much it computes. The router hashes a prompt's full blocks as the
engine does (engine/kv_cache.py: the same chain from the request's cache salt, never the last
block) and keeps, per worker, the hashes it believes that worker holds, most recent last, at most
that worker's KV capacity in blocks. Two sources feed it: the router records a prompt's hashes when
it sends the prompt (and prompt + answer when a request ends), so the next request sees them at
once; and `IndexFollower` applies what each worker's cache reports it stored and evicted
(CacheEvents), every CACHE_SYNC_S, in the order it happened, so an evicted block stops counting
within about that long. A candidate's cost is the blocks it would compute plus a load term, and
the cheapest serving worker wins:

    cost(w) = (prompt blocks - cached leading blocks on w) + LOAD_BLOCKS * requests in flight on w

With caching off there is no index and the router picks the least loaded worker, as before. The
index is keyed by worker handle: a restarted or switched worker (a new handle) starts empty.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

from cluster.pools import WorkerHandle, is_actor_death
from engine.kv_cache import CacheEvents, cache_key, prefix_hashes

log = logging.getLogger(__name__)

# What one request in flight on a worker weighs against blocks to compute: about one 16-token
# block's prefill per request (a request in flight delays a new one by a share of a step).
LOAD_BLOCKS = 1.0
# How often the index asks each worker what its cache stored and evicted: an evicted block may
# still count for about this long (a cost estimate only: a wrong guess costs compute, never output).
CACHE_SYNC_S = 0.5


class PrefixIndex:
    def __init__(
        self,
        block_size: int,
        capacity_blocks: int,
        image_token_id: int | None = None,
        load_blocks: float = LOAD_BLOCKS,
    ) -> None:
        """image_token_id: a vision-language model's image placeholder (prompts with images are
        keyed by their images' content hashes over its positions, as the workers key them)."""
        self.block_size = block_size
        self.image_token_id = image_token_id
        self.capacity_blocks = capacity_blocks
        self.load_blocks = load_blocks
        self._held: weakref.WeakKeyDictionary[WorkerHandle, OrderedDict[bytes, None]] = weakref.WeakKeyDictionary()

    def hashes(
        self,
        token_ids: Sequence[int],
        salt: str = "",
        image_hashes: Sequence[bytes] = (),
        prompt_len: int | None = None,
    ) -> list[bytes]:
        """The hashes the engine looks a prompt's blocks up by (engine/kv_cache.py prefix_hashes);
        `token_ids` may go on past the prompt (its first prompt_len, default all): an answer's
        blocks are keyed as the worker that generated them keys them. None of them (the prompt goes
        by load) when its image tokens do not make its images (cache_key's ValueError)."""
        try:
            key = cache_key(salt, token_ids[:prompt_len], self.image_token_id, image_hashes)
        except ValueError as err:
            log.warning("a prompt is routed by load: %s", err)
            return []
        return list(prefix_hashes(token_ids, self.block_size, key))

    def overlap(self, worker: WorkerHandle, hashes: list[bytes]) -> int:
        """Leading blocks of `hashes` the router believes `worker` holds."""
        held = self._held.get(worker)
        n = 0
        while held and n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def cost(self, worker: WorkerHandle, hashes: list[bytes]) -> float:
        """Blocks `worker` would compute (or receive) for the prompt, plus its load (module docstring)."""
        return len(hashes) - self.overlap(worker, hashes) + self.load_blocks * worker.inflight

    def ranked(self, pool: list[WorkerHandle], hashes: list[bytes]) -> list[WorkerHandle]:
        """The serving workers, least cost first (ties: pool order)."""
        return sorted((w for w in pool if w.serving), key=lambda w: self.cost(w, hashes))

    def pick(self, pool: list[WorkerHandle], hashes: list[bytes]) -> WorkerHandle | None:
        """The serving worker of least cost; None when none serves."""
        return next(iter(self.ranked(pool, hashes)), None)

    def record(self, worker: WorkerHandle, hashes: list[bytes]) -> None:
        """`worker` now holds these blocks (it is computing or has computed them)."""
        held = self._held.setdefault(worker, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)

    def apply(self, worker: WorkerHandle, events: CacheEvents) -> None:
        """What `worker`'s cache stored and evicted since its last report, in order; a snapshot
        (its log overflowed) replaces what the index believed first."""
        if events.snapshot is not None:
            self._held[worker] = OrderedDict.fromkeys(events.snapshot)
        held = self._held.setdefault(worker, OrderedDict())
        for stored, h in events.events:
            if stored:
                held[h] = None
                held.move_to_end(h)
            else:
                held.pop(h, None)
        while len(held) > self.capacity_blocks:
            held.popitem(last=False)

    def blocks_held(self, worker: WorkerHandle) -> int:
        return len(self._held.get(worker) or ())


class IndexFollower:
    """Keeps a PrefixIndex following the workers' caches: every CACHE_SYNC_S each live prefill and
    decode (or colocated) worker whose previous answer came back is asked for its cache events,
    which are applied in order. A slow worker (a long prefill batch) holds back only its own
    answer; a dead one is left to the router's death handling."""

    def __init__(self, index: PrefixIndex, workers: Callable[[], list[WorkerHandle]]) -> None:
        self.index = index
        self._workers = workers
        self._asked: dict[WorkerHandle, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._warned: weakref.WeakSet[WorkerHandle] = weakref.WeakSet()  # one warning per handle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._asked.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def sync(self) -> None:
        """One round, waiting for every answer (tests; the loop does not wait)."""
        self._ask()
        await asyncio.gather(*self._asked.values(), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._ask()
            await asyncio.sleep(CACHE_SYNC_S)

    def _ask(self) -> None:
        workers = [w for w in self._workers() if w.alive and not w.retired]
        self._asked = {w: t for w, t in self._asked.items() if w in workers and not t.done()}
        loop = asyncio.get_running_loop()
        for w in workers:
            if w not in self._asked:
                self._asked[w] = loop.create_task(self._fetch(w))

    async def _fetch(self, worker: WorkerHandle) -> None:
        try:
            events = await worker.actor.cache_events.remote()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_actor_death(exc) and worker not in self._warned:  # a death is the router's to report
                self._warned.add(worker)
                log.warning(
                    "reading the cache events of %s failed (it is routed on older ones): %s", worker.worker_id, exc
                )
            return
        self.index.apply(worker, events)
