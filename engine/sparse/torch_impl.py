"""Block-sparse prefill attention in plain torch (the CPU path; same contract as the Triton kernel).

Work unit: a (query head, query block) pair with its `count` key blocks. Pairs are grouped by
EXACT count (and by whether the last slot is the diagonal block), so one group is a dense
batched problem with no padding slots and one masking rule:

    Q   [P, B, D]          the pair's query rows (rows outside [q_offset, Lk) are zero, dropped)
    K,V [P, C*B, D]        gathered key blocks (kv head = q head // group; index_select of
                           whole blocks, the only copy of K/V)
    S = Q K^T [P, B, C*B]  -> causal mask on the last slot only -> softmax -> @ V

Only the diagonal block (kb == absolute query block) needs the causal mask and, because block
ids are ascending and causal, it can only be the last slot. So masking touches 1/C of the
scores (a -inf triangle added in place). Measured at 8K, density 0.4 (SmolLM2 shapes, one
thread, Zen 4): the two bmm take ~3/4 of the time at about the FLOP rate of dense SDPA, softmax
~1/9, K/V gathers ~1/16; B=128 beats B=64 (fewer, larger matmuls).
"""

from __future__ import annotations

import torch

from .block_index import BlockIndex, num_key_blocks

# Scores per batched matmul (fp32 elements): 1 MiB of scores stays in a core's L2 while softmax
# and the second bmm read them back. At 8K, random index, one thread: 0.307 s at density 0.3 and
# 0.405 s at 0.4, vs 0.355 / 0.445 s with 4 MiB chunks (min of 4 runs each).
_CHUNK_ELEMS = 1 << 18


def _padded(x: torch.Tensor, heads: int, rows: int, front: int, scale: float | None) -> torch.Tensor:
    """x [L, H, D] -> fp32 [H, rows, D] with x (times scale) at rows [front, front + L), the
    other rows zero."""
    length, _, d = x.shape
    out = torch.empty(heads, rows, d, dtype=torch.float32, device=x.device)
    out[:, :front].zero_()
    out[:, front + length :].zero_()
    dst = out[:, front : front + length]
    if scale is None:
        dst.copy_(x.transpose(0, 1))
    else:
        torch.mul(x.transpose(0, 1).float(), scale, out=dst)
    return out


def block_sparse_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex, scale: float, chunk_elems: int = _CHUNK_ELEMS
) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D] (q's dtype; computed in fp32)."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    b = index.block_size
    if lk != index.kv_len or lk - lq != index.q_offset or hq != index.num_heads:
        raise ValueError(
            f"shapes q={tuple(q.shape)} k={tuple(k.shape)} do not match the index "
            f"(Hq={index.num_heads}, q_offset={index.q_offset}, Lk={index.kv_len})"
        )
    group = hq // hkv
    nqb = index.block_ids.shape[1]
    nkb = num_key_blocks(lk, b)
    first = index.first_q_block
    front = index.q_offset - first * b  # padding rows before the first query row
    dev = q.device

    # Padded fp32 copies [H, blocks * B, D], written once: only the padding rows are zeroed.
    # (Zero-filling whole buffers first costs a full extra pass over each at 8K.)
    qp = _padded(q, hq, nqb * b, front, scale)
    kp = _padded(k, hkv, nkb * b, 0, None)
    vp = _padded(v, hkv, nkb * b, 0, None)
    qb = qp.view(-1, b, d)  # [Hq*NQB, B, D]
    kflat, vflat = kp.view(-1, b * d), vp.view(-1, b * d)  # [Hkv*NKB, B*D]
    out = torch.empty_like(qb)  # every pair is written below

    counts = index.counts.reshape(-1).long()
    npairs = counts.numel()
    ids_all = index.block_ids.reshape(npairs, -1).long()
    pair = torch.arange(npairs, device=dev)
    kv_rows_all = (pair // (nqb * group))[:, None] * nkb + ids_all  # [pairs, MAXK]
    # Only the last slot can be the diagonal block (ids ascending, causal).
    last = ids_all.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
    diag = (counts > 0) & (last == first + pair % nqb)
    # Groups of equal (count, diagonal or not): no per-chunk tests, no mixed masking.
    key = counts * 2 + (~diag).long()
    order = torch.argsort(key, stable=True)
    uniq, sizes = torch.unique_consecutive(key[order], return_counts=True)
    # Query and key blocks share the B grid, so in a diagonal block row r sees columns <= r:
    # one triangular bias (-inf above the diagonal, added to the finite scores) serves every
    # diagonal. Keys >= Lk sit in the last key block above the diagonal of every real row, so
    # the triangle masks them too (padding rows are dropped).
    future = torch.zeros(b, b, device=dev).masked_fill_(
        torch.ones(b, b, dtype=torch.bool, device=dev).triu_(1), float("-inf")
    )
    start = 0
    for g, n in zip(uniq.tolist(), sizes.tolist()):
        c, has_diag = g // 2, g % 2 == 0
        if c == 0:  # pairs with no key block give 0
            out.index_fill_(0, order[start : start + n], 0.0)
            start += n
            continue
        step = max(1, chunk_elems // (b * b * c))
        for s in range(start, start + n, step):
            pairs = order[s : min(s + step, start + n)]
            kv_rows = kv_rows_all[pairs, :c].reshape(-1)
            kk = kflat.index_select(0, kv_rows).view(-1, c * b, d)
            vv = vflat.index_select(0, kv_rows).view(-1, c * b, d)
            scores = torch.bmm(qb.index_select(0, pairs), kk.transpose(1, 2))  # [P, B, C*B]
            if has_diag:
                scores[:, :, -b:].add_(future)
            out.index_copy_(0, pairs, torch.bmm(torch.softmax(scores, dim=-1), vv))
        start += n
    out = out.view(hq, nqb * b, d)[:, front : front + lq]
    return out.transpose(0, 1).to(q.dtype)
