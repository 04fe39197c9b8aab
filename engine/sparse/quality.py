"""Attention mass kept by a block index: how much of the true softmax attention it covers."""

from __future__ import annotations

import torch

from .block_index import BlockIndex


def attention_mass_kept(
    q: torch.Tensor, k: torch.Tensor, index: BlockIndex, scale: float, rows_per_chunk: int = 512
) -> tuple[float, float, torch.Tensor]:
    """q [Lq, Hq, D], k [Lk, Hkv, D] -> (mean over heads, 10th percentile over heads, per-head
    fp32 [Hq]) of the true causal softmax mass that falls inside the index's computed pairs,
    averaged over query rows. Exact; memory O(Hq * rows_per_chunk * Lk)."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    b = index.block_size
    group = hq // hkv
    mask = index.to_mask()  # [Hq, NQB, NKB]
    kt = k.float().permute(1, 2, 0)  # [Hkv, D, Lk]
    keys = torch.arange(lk, device=q.device)
    pad = mask.shape[-1] * b - lk
    kept = torch.zeros(hq, device=q.device)
    for r0 in range(0, lq, rows_per_chunk):
        r1 = min(lq, r0 + rows_per_chunk)
        pos = torch.arange(index.q_offset + r0, index.q_offset + r1, device=q.device)
        qc = q[r0:r1].float().permute(1, 0, 2).reshape(hkv, group * (r1 - r0), d)
        s = (torch.bmm(qc, kt) * scale).view(hq, r1 - r0, lk)
        p = torch.softmax(s.masked_fill_(keys > pos[:, None], float("-inf")), -1)
        per_block = torch.nn.functional.pad(p, (0, pad)).view(hq, r1 - r0, -1, b).sum(-1)
        rows = mask[:, pos // b - index.first_q_block]  # [Hq, R, NKB]
        kept += (per_block * rows).sum((1, 2))
    per_head = kept / lq
    return per_head.mean().item(), torch.quantile(per_head, 0.1).item(), per_head
