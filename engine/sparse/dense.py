"""Dense causal prefill attention (SDPA): the baseline and the short-prompt path."""

from __future__ import annotations

import torch


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                           scale: float) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D]; query row i sits at q_offset + i.

    SDPA gets 4-D [1, H, L, D] views: 3-D inputs fall back to the unfused math path on CPU.
    On CPU the KV heads are expanded (measured faster than enable_gqa there); on CUDA the fused
    kernels take GQA directly.
    """
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    qt = q.transpose(0, 1)[None]
    kt = k.transpose(0, 1)[None]
    vt = v.transpose(0, 1)[None]
    gqa = hq != hkv
    if gqa and q.device.type == "cpu":
        kt = kt.repeat_interleave(hq // hkv, dim=1)
        vt = vt.repeat_interleave(hq // hkv, dim=1)
        gqa = False
    if q_offset == 0:
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        pos = torch.arange(q_offset, q_offset + lq, device=q.device)
        mask = torch.arange(lk, device=q.device)[None, :] <= pos[:, None]
        out = torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)
