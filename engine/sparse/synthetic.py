"""Synthetic block indexes at a chosen density (tests and benchmarks)."""

from __future__ import annotations

import torch

from .block_index import BlockIndex, causal_block_mask


def random_index(
    num_heads: int,
    q_offset: int,
    kv_len: int,
    block_size: int,
    density: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> BlockIndex:
    """Sink and diagonal blocks plus uniformly random causal blocks, about `density` of all
    causal blocks in total (density 1.0 gives the full causal index)."""
    causal = causal_block_mask(q_offset, kv_len, block_size)
    nqb, nkb = causal.shape
    diag = torch.arange(nqb)[:, None] + q_offset // block_size == torch.arange(nkb)[None, :]
    forced = (torch.arange(nkb)[None, :] == 0) | diag
    total = causal.sum().item()
    n_forced = (forced & causal).sum().item()
    p = min(1.0, max(0.0, (density * total - n_forced) / max(total - n_forced, 1)))
    draw = torch.rand(num_heads, nqb, nkb, generator=generator) < p
    mask = (draw | forced) & causal
    return BlockIndex.from_mask(mask.to(device), block_size, q_offset, kv_len)
