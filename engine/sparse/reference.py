"""Dense masked reference for block-sparse prefill attention (tests and quality checks only)."""

from __future__ import annotations

import torch

from .block_index import BlockIndex


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex, scale: float
) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D] in q's dtype, computed in fp32.

    Attends exactly the pairs in index.token_mask(); rows with no allowed key give 0.
    Memory is O(Hq * Lq * Lk): keep shapes test-sized.
    """
    lq, hq, _ = q.shape
    hkv = k.shape[1]
    allowed = index.token_mask()  # [Hq, Lq, Lk]
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # [Hq, Lk, D]
    vf = v.float().transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
    scores = (qf @ kf.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vf).transpose(0, 1).to(q.dtype)
