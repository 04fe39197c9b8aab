"""Dense causal prefill attention (SDPA): the engine's dense prefill path, the sparse path's
fallback for short prompts, and the baseline sparse attention is measured against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_offset: int, q_len: int, k_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[q_len, k_len] bool: query i (absolute position q_offset + i) sees keys <= itself."""
    pos = torch.arange(q_offset, q_offset + q_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= pos[:, None]


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float
) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D]; query row i sits at q_offset + i (a
    prompt chunk after earlier context: q_offset = Lk - Lq).

    SDPA gets 4-D [1, H, L, D] views: 3-D inputs fall back to the unfused math path on CPU
    (~6x slower at 8K). Grouped KV heads go to SDPA as they are (enable_gqa): on CPU that is as
    fast as expanding them with repeat_interleave or faster, with identical output
    (bench/gqa_prefill.py, SmolLM2 geometry, torch 2.13: within 6% either way on 1 thread,
    1-13% faster on 2), and on CUDA the fused kernels take GQA directly.
    """
    lq, lk = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if q_offset == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = causal_mask(q_offset, lq, lk, q.device)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)
