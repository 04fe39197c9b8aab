"""Paged KV cache bookkeeping: a pool of free block ids and the block tables of sequences.

The cache tensor itself and the block/slot geometry are `engine.kv_layout.KVLayout`'s; this
module only hands out block ids.

The manager separates checking from changing: `can_allocate` never changes state, `allocate`
assumes the check passed (it raises if not, never half-allocates), and `free` gives a whole
table back or, if any id in it is not owned, refuses without changing anything.
"""

from __future__ import annotations

from collections import deque

from engine.errors import EngineError


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

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def all_free(self) -> bool:
        return self.pool.num_free == self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, block_table: list[int], total_tokens: int) -> int:
        """New blocks a table needs so that it covers `total_tokens` tokens."""
        return max(0, self.blocks_for(total_tokens) - len(block_table))

    def can_allocate(self, block_table: list[int], total_tokens: int) -> bool:
        return self.blocks_needed(block_table, total_tokens) <= self.pool.num_free

    def allocate(self, block_table: list[int], total_tokens: int) -> list[int]:
        """Grow `block_table` in place to cover `total_tokens`; returns the new block ids."""
        new = self.pool.take(self.blocks_needed(block_table, total_tokens))
        block_table.extend(new)
        return new

    def free(self, block_table: list[int]) -> None:
        """Give every block of the table back and empty it; EngineError (table and pool
        unchanged) if one of them is not owned (BlockPool.give_back)."""
        self.pool.give_back(block_table)
        block_table.clear()
