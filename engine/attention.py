"""Paged attention registered with transformers' attention interface.

The engine runs a *packed* batch: every scheduled token of every sequence in one row,
`query` [1, Hq, T, D], `key`/`value` [1, Hkv, T, D] (after RoPE, positions from position_ids).
For each layer this function
  1. writes the new K/V into the paged cache at `slot_mapping` (one index_copy per tensor),
  2. tells an optional listener that the layer's K/V are complete (layer-wise KV streaming),
  3. attends: prefill segments one by one (a segment with no earlier context attends to its own
     K/V without touching the cache; a later chunk gathers its context from the cache), and all
     single-token decode rows in one padded, masked SDPA call.
Called without `triptych_meta` (e.g. by `generate()`), it is plain SDPA, so one loaded model
serves both the engine and the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_IMPLEMENTATION = "triptych_paged"


@dataclass
class PrefillSegment:
    """Rows [q_start, q_start + q_len) of the packed batch; the sequence then holds ctx_len tokens.

    ctx_slots: cache slots of all ctx_len tokens, or None when q_len == ctx_len (no earlier context).
    """

    q_start: int
    q_len: int
    ctx_len: int
    ctx_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    kv: torch.Tensor                      # [layers, 2, blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor            # [T] cache slot of each packed token
    prefills: list[PrefillSegment]
    decode_rows: torch.Tensor | None      # [B] packed row of each decode token
    decode_slots: torch.Tensor | None     # [B, Lmax] context slots, padded with slot 0
    decode_mask: torch.Tensor | None      # [B, 1, 1, Lmax] True where a real context token
    on_layer_done: Callable[[int], None] | None = None
    sparse: object | None = None          # engine.sparse.SparsePrefillConfig


def causal_offset_mask(q_len: int, k_len: int) -> torch.Tensor:
    """[q_len, k_len] bool: query i (absolute position k_len - q_len + i) sees keys <= itself."""
    offset = k_len - q_len
    return torch.arange(k_len)[None, :] <= (torch.arange(q_len)[:, None] + offset)


def _attend_segment(q, k, v, scale, sparse) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] → [Lq, Hq, D], causal with offset Lk - Lq."""
    lq, lk = q.shape[0], k.shape[0]
    if sparse is not None and getattr(sparse, "method", "dense") != "dense":
        from engine.sparse import sparse_prefill_attention

        out, _ = sparse_prefill_attention(q, k, v, q_offset=lk - lq, scale=scale, config=sparse)
        return out
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if lq == lk:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = causal_offset_mask(lq, lk)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    meta: AttentionMetadata | None = kwargs.get("triptych_meta")
    if meta is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    q = query[0].transpose(0, 1)   # [T, Hq, D]
    k = key[0].transpose(0, 1)     # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    n_kv, d = k.shape[1], k.shape[2]
    k_cache = meta.kv[layer, 0].view(-1, n_kv, d)
    v_cache = meta.kv[layer, 1].view(-1, n_kv, d)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.on_layer_done is not None:
        meta.on_layer_done(layer)

    out = torch.empty_like(q)
    for seg in meta.prefills:
        rows = slice(seg.q_start, seg.q_start + seg.q_len)
        if seg.ctx_slots is None:
            ks, vs = k[rows], v[rows]
        else:
            ks, vs = k_cache[seg.ctx_slots], v_cache[seg.ctx_slots]
        out[rows] = _attend_segment(q[rows], ks, vs, scaling, meta.sparse)
    if meta.decode_rows is not None:
        qd = q[meta.decode_rows].unsqueeze(2)                    # [B, Hq, 1, D]
        kd = k_cache[meta.decode_slots].transpose(1, 2)          # [B, Hkv, L, D]
        vd = v_cache[meta.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scaling, enable_gqa=True)
        out[meta.decode_rows] = od.squeeze(2)
    return out.unsqueeze(0), None


def register() -> str:
    """Register the implementation (idempotent) and return its name for `config._attn_implementation`."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
