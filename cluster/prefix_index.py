"""Cache-aware routing: the router's estimate of which worker's prefix cache holds a prompt's blocks.

With `engine.prefix_caching` on, a worker computes only the part of a prompt its cache lacks, so
where a request goes decides how much it computes. The router hashes a prompt's full blocks as the
engine does (engine/kv_cache.py: the same chain from the request's cache salt, never the last
block) and keeps, per worker, the hashes of the prompts it sent there, most recent last, at most
that worker's KV capacity in blocks (an approximate index: it does not hear the workers'
evictions, so it may count a block that was since evicted; never the other way round for a block
it sent). A candidate's cost is the blocks it would compute plus a load term, and the cheapest
serving worker wins:

    cost(w) = (prompt blocks - cached leading blocks on w) + LOAD_BLOCKS * requests in flight on w

With caching off there is no index and the router picks the least loaded worker, as before. The
index is keyed by worker handle: a restarted or switched worker (a new handle) starts empty.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence

from cluster.pools import WorkerHandle
from engine.kv_cache import cache_root, prefix_hashes

# What one request in flight on a worker weighs against blocks to compute: about one 16-token
# block's prefill per request (a request in flight delays a new one by a share of a step).
LOAD_BLOCKS = 1.0


class PrefixIndex:
    def __init__(self, block_size: int, capacity_blocks: int, load_blocks: float = LOAD_BLOCKS) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.load_blocks = load_blocks
        self._held: weakref.WeakKeyDictionary[WorkerHandle, OrderedDict[bytes, None]] = weakref.WeakKeyDictionary()

    def hashes(self, token_ids: Sequence[int], salt: str = "") -> list[bytes]:
        """The hashes the engine looks a prompt's blocks up by (engine/kv_cache.py prefix_hashes)."""
        return list(prefix_hashes(token_ids, self.block_size, cache_root(salt)))

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

    def blocks_held(self, worker: WorkerHandle) -> int:
        return len(self._held.get(worker) or ())
