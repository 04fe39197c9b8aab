"""Paged KV cache bookkeeping: a pool of free block ids and the block tables of sequences.

The cache tensor itself and the block/slot geometry are `engine.kv_layout.KVLayout`'s; this
module only hands out block ids.

The manager separates checking from changing: `can_allocate` never changes state, `allocate`
assumes the check passed (it raises if not, never half-allocates), and `free` gives a whole
table back or, if any id in it is not owned, refuses without changing anything.

Prefix caching (`prefix_caching=True`). A full block whose K/V are computed is identified by a
hash chained from its parent block's hash, its token ids and its extra keys (`block_hash`). A
sequence's `CacheKey` gives both: the chain starts from its cache salt's root (requests with
different salts never share a block), and a block that holds any placeholder token of an image is
keyed by that image's content hash too (two prompts with the same token ids but different images
never share such a block, nor any after it). The manager keeps hash -> block for such blocks and a reference count per block (how many
tables hold it). A block whose last holder frees it stays cached, unreferenced, in LRU order, and
is evicted (its hash forgotten, the block reused) only when an allocation finds no free block: a
cached block never stands in the way of a request that would run without caching. A new sequence
takes the longest run of cached blocks matching its prompt (`match_prefix` / `take_prefix`) and
computes only the rest. Invariant: free + cached-unreferenced + in use = total (`check`).
With prefix caching off, only the blocks of keys marked `always` are cached: the choices of one
request (CHOICES_SALT), which share its prompt's blocks and no one else's.

The manager also logs what it stores and evicts, in order (`drain_events`): the worker hands the
log to the router, whose index of which worker holds which blocks (cluster/prefix_index.py)
follows the workers' caches instead of guessing.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from engine.errors import EngineError

ROOT = b""  # the chain's start for requests without a cache salt
# The salt of the choices of one request (OpenAI `n` > 1; `choices_salt`): no client can send it
# (a client's salt is printable), so only those choices share its blocks, and they are cached even
# where prefix caching is off: the later choices compute only the prompt's last block.
CHOICES_SALT = "\x00choices:"


@dataclass(frozen=True)
class CacheKey:
    """What a sequence's block hashes are keyed by besides its token ids: `root`, the chain's start
    (from its cache salt), and `images`, one (first position, end position, content hash) per
    image of the prompt, spanning that image's placeholder tokens (`cache_key`); `always` for
    the choices of one request (CHOICES_SALT)."""

    root: bytes = ROOT
    images: tuple[tuple[int, int, bytes], ...] = ()
    always: bool = False  # cached even where prefix caching is off (the choices of one request)

    def extra(self, start: int, end: int) -> bytes:
        """The content hashes of the images with a placeholder token in positions [start, end)."""
        return b"".join(h for first, last, h in self.images if first < end and last > start)


SHARED = CacheKey()  # no salt, no images: shares with every such request


def image_hash(data: bytes) -> bytes:
    """An image's content hash, as cache keys take it (of its encoded bytes)."""
    return hashlib.blake2b(data, digest_size=16, person=b"triptych-image").digest()


def choices_salt(group: str) -> str:
    """The cache salt of the choices of one request; `group`: an id only they carry."""
    return CHOICES_SALT + group


def cache_key(
    salt: str = "", token_ids: Sequence[int] = (), image_token_id: int | None = None, image_hashes: Sequence[bytes] = ()
) -> CacheKey:
    """The cache key of a prompt: its salt's root ('' shares with every request) and, with images,
    each image's content hash over its placeholder tokens in `token_ids` (image tokens expanded:
    the images' runs of `image_token_id`, in order, equally long). ValueError when the prompt's
    placeholders do not split into len(image_hashes) equal unbroken runs."""
    root = ROOT if not salt else hashlib.blake2b(b"salt:" + salt.encode(), digest_size=16).digest()
    always = salt.startswith(CHOICES_SALT)
    if not image_hashes:
        return CacheKey(root, always=always)
    places = [i for i, t in enumerate(token_ids) if t == image_token_id]
    per, rest = divmod(len(places), len(image_hashes))
    if image_token_id is None or not per or rest:
        raise ValueError(f"{len(places)} image tokens do not make {len(image_hashes)} images")
    spans = tuple((places[j * per], places[(j + 1) * per - 1] + 1, h) for j, h in enumerate(image_hashes))
    if any(end - start != per for start, end, _ in spans):
        raise ValueError(f"{len(places)} image tokens do not make {len(image_hashes)} unbroken runs")
    return CacheKey(root, spans, always)


def block_hash(parent: bytes, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """The hash of a full block: its parent's hash, its token ids and its extra keys (the content
    hashes of the images it holds tokens of; blake2b, 16 bytes: a collision would hand one
    request another's K/V, so not Python's hash())."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())  # fixed width: no two id lists give the same bytes
    h.update(extra)  # fixed-width hashes after fixed-width ids: unambiguous
    return h.digest()


def prefix_hashes(token_ids: Sequence[int], block_size: int, key: CacheKey = SHARED) -> Iterator[bytes]:
    """The chained hashes of the full blocks of `token_ids` that may come from a cache: all but the
    block holding the last token (its logits are needed), in order; lazily, so a lookup stops at
    its first miss. The engine (match_prefix) and the router (cluster/prefix_index.py) use it."""
    parent = key.root
    for i in range((len(token_ids) - 1) // block_size):
        start, end = i * block_size, (i + 1) * block_size
        parent = block_hash(parent, token_ids[start:end], key.extra(start, end))
        yield parent


@dataclass(frozen=True)
class CacheEvents:
    """What a prefix cache stored and evicted since the last drain, oldest first: (True, hash) for a
    block now cached, (False, hash) for one evicted. When the log overflowed (more changes than
    `BlockManager.max_events` between two drains) there are no events and `snapshot` holds every
    hash cached now, which replaces what the reader knew; otherwise `snapshot` is None."""

    events: tuple[tuple[bool, bytes], ...] = ()
    snapshot: tuple[bytes, ...] | None = None


class BlockPool:
    """Free list of block ids. Invariant: every id in [0, num_blocks) is either free here or
    owned by one sequence; `give_back` keeps it by refusing an id that is already free (a double
    free) or not of this pool."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise EngineError(f"asked for {n} KV blocks, only {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def give_back(self, ids: list[int]) -> None:
        """Return owned ids to the pool; all or nothing: EngineError, with no id returned, if
        one is not a block of this pool, is already free, or appears twice."""
        seen: set[int] = set()
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.num_blocks:
                raise EngineError(f"KV block id {i!r} is not a block of this pool (0..{self.num_blocks - 1})")
            if self._is_free[i]:
                raise EngineError(f"KV block {i} is already free (freed twice)")
            if i in seen:
                raise EngineError(f"KV block {i} appears twice in the ids given back")
            seen.add(i)
        for i in ids:
            self._is_free[i] = True
        self._free.extend(ids)


class BlockManager:
    """Owns the block tables of sequences; a sequence is anything with a `block_table` list."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks  # tables holding each block (prefix caching)
        self._by_hash: dict[bytes, int] = {}  # cached full blocks
        self._hash_of: dict[int, bytes] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: oldest first
        self.evictions = 0
        self.hit_tokens = 0  # prompt tokens served from the cache (take_prefix), for metrics
        self.query_tokens = 0  # prompt tokens looked up
        # stored / evicted hashes since the last drain_events; past max_events the log is dropped
        # and the next drain answers a snapshot instead (a reader that never drains costs nothing more)
        self.max_events = 2 * num_blocks
        self._events: list[tuple[bool, bytes]] = []
        self._events_lost = False

    def _log(self, stored: bool, h: bytes) -> None:
        if self._events_lost:
            return
        if len(self._events) >= self.max_events:
            self._events.clear()
            self._events_lost = True
            return
        self._events.append((stored, h))

    def drain_events(self) -> CacheEvents:
        """The stores and evictions since the last call (CacheEvents); call it on the thread that
        changes the manager."""
        if self._events_lost:
            self._events_lost = False
            return CacheEvents(snapshot=tuple(self._by_hash))
        events, self._events = tuple(self._events), []
        return CacheEvents(events)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and cached ones no table holds."""
        return self.pool.num_free + len(self._lru)

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks some table holds."""
        return self.pool.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Cached blocks no table holds (kept for reuse, evicted on demand)."""
        return len(self._lru)

    def cached_blocks(self) -> list[int]:
        """Every block the cache identifies by a hash (held or not)."""
        return list(self._by_hash.values())

    def all_free(self) -> bool:
        """No table holds a block (cached blocks may remain: they are reusable, not held)."""
        return self.num_used_blocks == 0

    def check(self) -> None:
        """EngineError unless free + cached-unreferenced + in use = total and the references add up."""
        held = sum(1 for r in self._refs if r > 0)
        if self.pool.num_free + len(self._lru) + held != self.pool.num_blocks:
            raise EngineError(
                f"KV block accounting broken: {self.pool.num_free} free + {len(self._lru)} cached + {held} in use "
                f"!= {self.pool.num_blocks}"
            )

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, block_table: list[int], total_tokens: int) -> int:
        """New blocks a table needs so that it covers `total_tokens` tokens."""
        return max(0, self.blocks_for(total_tokens) - len(block_table))

    def can_allocate(self, block_table: list[int], total_tokens: int, prefix: Sequence[int] = ()) -> bool:
        """prefix: cached blocks the table will take first (match_prefix); those that no table
        holds now stop being evictable, so they count against the room."""
        revived = sum(1 for b in prefix if self._refs[b] == 0)
        need = max(0, self.blocks_for(total_tokens) - len(block_table) - len(prefix))
        return need <= self.num_free_blocks - revived

    def allocate(self, block_table: list[int], total_tokens: int) -> list[int]:
        """Grow `block_table` in place to cover `total_tokens`; returns the new block ids."""
        new = self._take(self.blocks_needed(block_table, total_tokens))
        block_table.extend(new)
        return new

    def _take(self, n: int) -> list[int]:
        while self.pool.num_free < n and self._lru:  # evict the least recently used cached blocks
            block, _ = self._lru.popitem(last=False)
            h = self._hash_of.pop(block)
            del self._by_hash[h]
            self._log(False, h)
            self.pool.give_back([block])
            self.evictions += 1
        ids = self.pool.take(n)
        for b in ids:
            self._refs[b] = 1
        return ids

    def free(self, block_table: list[int]) -> None:
        """Give every block of the table back and empty it; EngineError (table and pool
        unchanged) if one of them is not owned (BlockPool.give_back). A cached block whose last
        holder this was stays cached (LRU), the others go back to the pool."""
        if not self._hash_of:  # no block is cached, so none is shared: each goes back
            self.pool.give_back(block_table)
            for b in block_table:
                self._refs[b] = 0
            block_table.clear()
            return
        seen: set[int] = set()
        for b in block_table:
            if not isinstance(b, int) or not 0 <= b < self.pool.num_blocks or self._refs[b] <= 0:
                raise EngineError(f"KV block {b!r} is not held (freed twice, or not a block of this pool)")
            if b in seen:
                raise EngineError(f"KV block {b} appears twice in the table")
            seen.add(b)
        for b in block_table:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self.pool.give_back([b])
        block_table.clear()

    # ------------------------------------------------------------ prefix caching
    def match_prefix(self, token_ids: Sequence[int], key: CacheKey = SHARED) -> tuple[list[int], list[bytes]]:
        """The cached blocks holding the longest run of `token_ids`' full blocks from the start,
        and their hashes; at least the last token is left to compute (its logits are sampled),
        so a prompt that is all cached blocks matches all but its last block. Changes nothing."""
        if not (self.prefix_caching or key.always):
            return [], []
        blocks, hashes = [], []
        for h in prefix_hashes(token_ids, self.block_size, key):
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
            hashes.append(h)
        return blocks, hashes

    def take_prefix(self, block_table: list[int], blocks: list[int], num_prompt_tokens: int) -> int:
        """Start an empty table with the cached `blocks` (match_prefix, just now); returns the
        tokens they hold (already computed)."""
        if block_table:
            raise EngineError("a cached prefix starts an empty block table")
        for b in blocks:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
        block_table.extend(blocks)
        self.query_tokens += num_prompt_tokens
        self.hit_tokens += len(blocks) * self.block_size
        return len(blocks) * self.block_size

    def register(
        self,
        block_table: list[int],
        hashes: list[bytes],
        token_ids: Sequence[int],
        num_computed: int,
        key: CacheKey = SHARED,
    ) -> None:
        """Cache the full blocks of a table whose K/V are now computed (the first `num_computed`
        tokens of `token_ids`); `hashes` holds the hashes of the blocks registered so far and is
        extended in place. A block whose hash is already cached elsewhere (computed twice at once)
        stays private to its table."""
        if not (self.prefix_caching or key.always):
            return
        bs = self.block_size
        for i in range(len(hashes), min(num_computed // bs, len(block_table))):
            h = block_hash(
                hashes[-1] if hashes else key.root, token_ids[i * bs : (i + 1) * bs], key.extra(i * bs, (i + 1) * bs)
            )
            hashes.append(h)
            b = block_table[i]
            if h not in self._by_hash and b not in self._hash_of:
                self._by_hash[h] = b
                self._hash_of[b] = h
                self._log(True, h)
