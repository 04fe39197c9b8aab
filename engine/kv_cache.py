"""Paged KV cache: one tensor of blocks, a pool of free block ids, and a manager per sequence.

Layout (shared with kv_transfer): kv[layer, 0 = key | 1 = value, block, offset, kv_head, head_dim].
A token's slot is block_id * block_size + offset, so kv[layer, i].view(-1, Hkv, D)[slot] is it.

The manager separates checking from changing: `can_allocate` never changes state, `allocate`
assumes the check passed (it raises if not, never half-allocates).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from engine.errors import EngineError


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @classmethod
    def from_model_config(cls, config, block_size: int, num_blocks: int, dtype: torch.dtype) -> "KVSpec":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, block_size, num_blocks, dtype)


def allocate_kv_tensor(spec: KVSpec) -> torch.Tensor:
    return torch.zeros(spec.shape, dtype=spec.dtype)


class BlockPool:
    """Free list of block ids. Invariant: every id is either free here or owned by one sequence."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise EngineError(f"asked for {n} KV blocks, only {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def give_back(self, ids: list[int]) -> None:
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
        self.pool.give_back(block_table)
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end) of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]
