"""Static sink + local + power-of-two-distance block pattern (PowerAttention-like baseline).

Query block j (absolute block a = q_offset // B + j) attends key block kb when any of:
    kb < sink                    attention sink
    a - kb < local               local window, diagonal included (local >= 1)
    a - kb is a power of two     exponentially spaced long-range blocks (1, 2, 4, 8, ...)
The same pattern serves every head; it is input-independent, so it is the baseline a dynamic
method has to beat at equal density.
"""

from __future__ import annotations

import torch

from .block_index import BlockIndex, num_key_blocks


def static_block_mask(
    num_heads: int,
    q_offset: int,
    kv_len: int,
    block_size: int,
    sink: int,
    local: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """bool [Hq, NQB, NKB] (causality is applied by BlockIndex.from_mask)."""
    if sink < 0 or local < 1:
        raise ValueError(f"need sink >= 0 and local >= 1, got sink={sink} local={local}")
    nkb = num_key_blocks(kv_len, block_size)
    a = torch.arange(q_offset // block_size, nkb, device=device)[:, None]
    kb = torch.arange(nkb, device=device)[None, :]
    dist = a - kb
    power_of_two = (dist > 0) & ((dist & (dist - 1)) == 0)
    mask = (kb < sink) | ((dist >= 0) & (dist < local)) | power_of_two
    return mask[None].expand(num_heads, -1, -1)


def static_index(
    num_heads: int,
    q_offset: int,
    kv_len: int,
    block_size: int,
    sink: int,
    local: int,
    device: torch.device | str = "cpu",
) -> BlockIndex:
    mask = static_block_mask(num_heads, q_offset, kv_len, block_size, sink, local, device)
    return BlockIndex.from_mask(mask, block_size, q_offset, kv_len)
