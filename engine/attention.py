"""Paged attention registered with transformers' attention interface.

The engine runs a *packed* batch: every scheduled token of every sequence in one row,
`query` [1, Hq, T, D], `key`/`value` [1, Hkv, T, D] (after RoPE, positions from position_ids).
For each layer this function
  1. writes the new K/V into the paged cache at `slot_mapping` (one index_copy per tensor),
  2. tells an optional listener that the layer's K/V are complete (layer-wise KV streaming),
  3. attends: prefill segments one by one (a segment with no earlier context attends to its own
     K/V without touching the cache; a later chunk gathers its context from the cache), and the
     single-token decode rows bucket by bucket: each bucket gathers its rows' whole KV blocks
     (index_select on block ids) into one padded tensor and runs one masked SDPA call. Rows are
     bucketed by context length (see model_runner) because the gather and SDPA cost scale with
     rows x longest context, not with the real context tokens. On CUDA the decode rows instead
     go to the Triton paged decode kernel (engine/paged_decode.py): one launch for all of them,
     reading the cache in place; the bucketed path stays for the CPU.
  4. with decode-side KV selection (`select`, engine/kv_select/selector.py): selected rows attend
     over their per-layer compact block tables instead, the queries selection scores with are
     captured, and rows due for a new selection add up the attention mass of their blocks.
Called without `triptych_meta` (e.g. by `generate()`), it is plain SDPA, so one loaded model
serves both the engine and the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine.kv_select.selector import SelectionPlan, block_mass, quest_pick
from engine.paged_decode import paged_decode_attention, paged_decode_attention_torch
from engine.sparse.dense import dense_causal_attention

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


@dataclass(frozen=True)
class DecodeBucket:
    """Single-token decode rows attended together, each over nb whole KV blocks (padded).

    rows [B]: packed row of each decode token; blocks [B * nb]: row i's block ids are
    blocks[i * nb:(i + 1) * nb], the tail padded with block 0; mask [B, 1, 1, nb * block_size]:
    True at the row's real context tokens (positions < its context length).
    """

    rows: torch.Tensor
    blocks: torch.Tensor
    mask: torch.Tensor


@dataclass
class AttentionMetadata:
    kv: torch.Tensor  # [layers, 2, blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor  # [T] cache slot of each packed token
    prefills: list[PrefillSegment]
    decodes: list[DecodeBucket]
    on_layer_done: Callable[[int], None] | None = None
    sparse: object | None = None  # engine.sparse.SparsePrefillConfig
    select: SelectionPlan | None = None  # decode-side KV selection of this forward

    @cached_property
    def decode_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All decode buckets as one paged-kernel batch, built on first use (once per forward):
        rows [S] (packed row of each decode token), block_tables [S, widest nb] int32 (narrower
        buckets padded with block 0), context_lens [S] int32 (the true entries of each row's mask),
        on the cache's device."""
        shapes = [(b.rows.shape[0], b.blocks.shape[0] // b.rows.shape[0]) for b in self.decodes]
        width = max(nb for _, nb in shapes)
        tables = [F.pad(b.blocks.view(n, nb), (0, width - nb)) for b, (n, nb) in zip(self.decodes, shapes)]
        lens = [b.mask.view(n, -1).sum(-1) for b, (n, _) in zip(self.decodes, shapes)]
        rows, dev = torch.cat([b.rows for b in self.decodes]), self.kv.device
        return rows.to(dev), torch.cat(tables).to(dev, torch.int32), torch.cat(lens).to(dev, torch.int32)


def _attend_segment(q, k, v, scale, sparse) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] → [Lq, Hq, D], causal with offset Lk - Lq."""
    lq, lk = q.shape[0], k.shape[0]
    if sparse is not None and getattr(sparse, "method", "dense") != "dense":
        from engine.sparse import sparse_prefill_attention

        out, _ = sparse_prefill_attention(q, k, v, q_offset=lk - lq, scale=scale, config=sparse)
        return out
    return dense_causal_attention(q, k, v, q_offset=lk - lq, scale=scale)


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    meta: AttentionMetadata | None = kwargs.get("triptych_meta")
    if meta is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = module.layer_idx
    q = query[0].transpose(0, 1)  # [T, Hq, D]
    k = key[0].transpose(0, 1)  # [T, Hkv, D]
    v = value[0].transpose(0, 1)
    n_kv, d = k.shape[1], k.shape[2]
    k_blocks, v_blocks = meta.kv[layer, 0], meta.kv[layer, 1]  # [blocks, block_size, Hkv, D]
    k_cache, v_cache = k_blocks.view(-1, n_kv, d), v_blocks.view(-1, n_kv, d)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if meta.on_layer_done is not None:
        meta.on_layer_done(layer)

    out = torch.empty_like(q)
    if meta.select is not None:
        _selection(meta.select, layer, q, k_blocks, v_blocks, out, scaling if scaling is not None else d**-0.5)
    for seg in meta.prefills:
        rows = slice(seg.q_start, seg.q_start + seg.q_len)
        if seg.ctx_slots is None:
            ks, vs = k[rows], v[rows]
        else:
            # index_select copies rows with a plain loop; advanced indexing (cache[idx]) is ~3x slower.
            ks, vs = k_cache.index_select(0, seg.ctx_slots), v_cache.index_select(0, seg.ctx_slots)
        out[rows] = _attend_segment(q[rows], ks, vs, scaling, meta.sparse)
    if meta.decodes and k_blocks.is_cuda:
        drows, tables, lens = meta.decode_batch
        scale = scaling if scaling is not None else d**-0.5
        od = paged_decode_attention(q.index_select(0, drows), k_blocks, v_blocks, tables, lens, scale)
        out.index_copy_(0, drows, od)
        return out.unsqueeze(0), None
    for bucket in meta.decodes:
        b = bucket.rows.shape[0]
        qd = q.index_select(0, bucket.rows).unsqueeze(2)  # [B, Hq, 1, D]
        kd = k_blocks.index_select(0, bucket.blocks).view(b, -1, n_kv, d).transpose(1, 2)  # [B, Hkv, L, D]
        vd = v_blocks.index_select(0, bucket.blocks).view(b, -1, n_kv, d).transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=bucket.mask, scale=scaling, enable_gqa=True)
        out.index_copy_(0, bucket.rows, od.squeeze(2))
    return out.unsqueeze(0), None


def _selection(sel: SelectionPlan, layer: int, q, k_blocks, v_blocks, out, scale: float) -> None:
    """This layer's part of decode-side KV selection (see the module docstring, step 4)."""
    bs, n_kv, d = k_blocks.shape[1], k_blocks.shape[2], k_blocks.shape[3]
    if sel.written_blocks is not None and sel.written_blocks.numel():  # quest: redo the written blocks' bounds
        kb = k_blocks.index_select(0, sel.written_blocks)  # [n, bs, Hkv, D]
        sel.bounds[layer].index_copy_(0, sel.written_blocks, torch.stack([kb.amin(1), kb.amax(1)], dim=1))
    if sel.capture_rows is not None:
        sel.captured.append(q.index_select(0, sel.capture_rows))
    for i, r in enumerate(sel.rescores):
        keys = k_blocks.index_select(0, r.blocks).view(-1, n_kv, d)
        recent = torch.cat([r.queries[layer], q[r.row : r.row + 1]])
        sel.scores[i].append(block_mass(recent, keys, r.ctx_len, bs, scale))
    if sel.selected is not None:
        s = sel.selected
        tables, lens = s.tables[layer], s.lens[layer]
        qd = q.index_select(0, s.rows)
        attend = paged_decode_attention if k_blocks.is_cuda else paged_decode_attention_torch
        out.index_copy_(0, s.rows, attend(qd, k_blocks, v_blocks, tables.int(), lens.int(), scale))
    if sel.quest:  # per row, this layer's picks; then one call for all of them
        picks = [quest_pick(q[r.row], sel.bounds[layer], r, bs) for r in sel.quest]
        tables = torch.nn.utils.rnn.pad_sequence([b for b, _ in picks], batch_first=True).int()
        lens = torch.tensor([n for _, n in picks], dtype=torch.int32, device=q.device)
        rows = torch.tensor([r.row for r in sel.quest], device=q.device)
        attend = paged_decode_attention if k_blocks.is_cuda else paged_decode_attention_torch
        out.index_copy_(0, rows, attend(q.index_select(0, rows), k_blocks, v_blocks, tables, lens, scale))


def register() -> str:
    """Register the implementation (idempotent) and return its name for `config._attn_implementation`."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION
