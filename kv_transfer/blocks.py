"""Copying K/V blocks between paged caches without temporaries where the block ids allow.

A layer view is [2, num_blocks, block_size, Hkv, D]. Runs of consecutive ids on both sides are
copied with one slice copy each (one pass over the bytes, no temporary); heavily fragmented
id lists fall back to index ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.kv_layout import KVLayout
from kv_transfer.layout import TransferMetadata

# Beyond this many runs, per-run slice copies cost more in call overhead than index ops.
_MAX_RUNS = 16


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split paired id lists into (src_start, dst_start, length) runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(
    dst_layer: torch.Tensor,
    dst_ids: Sequence[int],
    src: torch.Tensor,
    src_ids: Sequence[int] | None = None,
    non_blocking: bool = False,
) -> None:
    """dst_layer[:, dst_ids] = src[:, src_ids] (src_ids None: src is [2, len(dst_ids), ...])."""
    src_ids = range(len(dst_ids)) if src_ids is None else src_ids
    runs = block_runs(src_ids, dst_ids)
    if len(runs) <= _MAX_RUNS:
        for s, d, n in runs:
            dst_layer[:, d : d + n].copy_(src[:, s : s + n], non_blocking=non_blocking)
        return
    dst_idx = torch.as_tensor(dst_ids, dtype=torch.long, device=dst_layer.device)
    if not isinstance(src_ids, range) or src_ids != range(src.shape[1]):
        src = src.index_select(1, torch.as_tensor(src_ids, dtype=torch.long, device=src.device))
    dst_layer.index_copy_(1, dst_idx, src.to(dst_layer.device, non_blocking=non_blocking))


def gather_blocks(src: torch.Tensor, src_ids: Sequence[int] | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack src[:, src_ids] into a contiguous [2, n, ...] tensor (src_ids None: all of src)."""
    if src_ids is None:
        return src if src.is_contiguous() else src.contiguous()
    if out is None:
        out = torch.empty((2, len(src_ids), *src.shape[2:]), dtype=src.dtype, device=src.device)
    copy_blocks(out, range(len(src_ids)), src, src_ids)
    return out


def check_layer_blocks(
    layout: KVLayout,
    meta: TransferMetadata,
    layer: int,
    blocks: torch.Tensor,
    src_block_ids: Sequence[int] | None,
) -> None:
    """Raise ValueError unless `blocks` can fill `layer` of this transfer."""
    if layer not in meta.layers:
        raise ValueError(f"layer {layer} not in transfer range {meta.layers}")
    n = len(meta.dst_block_ids) if src_block_ids is None else blocks.shape[1]
    if src_block_ids is not None and len(src_block_ids) != len(meta.dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} src blocks for {len(meta.dst_block_ids)} dst blocks")
    if tuple(blocks.shape) != layout.layer_blocks_shape(n):
        raise ValueError(f"layer blocks of shape {tuple(blocks.shape)}, expected {layout.layer_blocks_shape(n)}")
    if blocks.dtype != layout.torch_dtype:
        raise ValueError(f"layer blocks of dtype {blocks.dtype}, expected {layout.torch_dtype}")
