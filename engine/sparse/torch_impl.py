"""Block-sparse prefill attention in plain torch (the CPU path; same contract as the Triton kernel).

Work unit: a (query head, query block) pair with its `count` key blocks. Pairs are grouped by
EXACT count, so one group is a dense batched problem with no padding slots:

    Q   [P, B, D]          the pair's query rows (rows outside [q_offset, Lk) are zero, dropped)
    K,V [P, C*B, D]        gathered key blocks (kv head = q head // group; index_select of
                           whole blocks, the only copy of K/V)
    S = Q K^T [P, B, C*B]  -> causal mask on the last slot only -> softmax -> @ V

Only the diagonal block (kb == absolute query block) needs the causal mask and, because block
ids are ascending and causal, it can only be the last slot. So masking touches 1/C of the
scores. Measured at 8K (SmolLM2 shapes, one thread): the two bmm take ~2/3 of the time, softmax
~1/5, gathers ~1/10; B=128 beats B=64 (fewer, larger matmuls).
"""

from __future__ import annotations

import torch

from .block_index import BlockIndex, num_key_blocks

# Scores per batched matmul (fp32 elements). ~4 MiB keeps a chunk's scores in the last-level
# cache on small CPUs; larger values only add memory traffic.
_CHUNK_ELEMS = 1 << 20


def block_sparse_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 index: BlockIndex, scale: float,
                                 chunk_elems: int = _CHUNK_ELEMS) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D] (q's dtype; computed in fp32)."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    b = index.block_size
    if lk != index.kv_len or lk - lq != index.q_offset or hq != index.num_heads:
        raise ValueError(f"shapes q={tuple(q.shape)} k={tuple(k.shape)} do not match the index "
                         f"(Hq={index.num_heads}, q_offset={index.q_offset}, Lk={index.kv_len})")
    group = hq // hkv
    nqb = index.block_ids.shape[1]
    nkb = num_key_blocks(lk, b)
    first = index.first_q_block
    front = index.q_offset - first * b          # padding rows before the first query row
    dev = q.device

    qp = q.new_zeros(hq, nqb * b, d, dtype=torch.float32)
    qp[:, front:front + lq] = q.transpose(0, 1).float() * scale
    kp = k.new_zeros(hkv, nkb * b, d, dtype=torch.float32)
    kp[:, :lk] = k.transpose(0, 1)
    vp = v.new_zeros(hkv, nkb * b, d, dtype=torch.float32)
    vp[:, :lk] = v.transpose(0, 1)
    qb = qp.view(-1, b, d)                      # [Hq*NQB, B, D]
    kflat, vflat = kp.view(-1, b * d), vp.view(-1, b * d)   # [Hkv*NKB, B*D]
    out = torch.zeros_like(qb)                  # pairs with count 0 stay 0

    counts = index.counts.reshape(-1).long()
    ids_all = index.block_ids.reshape(counts.numel(), -1)
    order = torch.argsort(counts, stable=True)
    uniq, sizes = torch.unique_consecutive(counts[order], return_counts=True)
    # Query and key blocks share the B grid, so in a diagonal block row r sees columns <= r:
    # one triangular mask serves every diagonal. Keys >= Lk sit in the last key block above the
    # diagonal of every real row, so the triangle masks them too (padding rows are dropped).
    future = torch.ones(b, b, dtype=torch.bool, device=dev).triu_(1)
    start = 0
    for c, n in zip(uniq.tolist(), sizes.tolist()):
        if c == 0:
            start += n
            continue
        step = max(1, chunk_elems // (b * b * c))
        for s in range(start, start + n, step):
            pairs = order[s:min(s + step, start + n)]
            ids = ids_all[pairs, :c].long()                              # [P, C]
            kv_rows = ((pairs // (nqb * group))[:, None] * nkb + ids).view(-1)
            kk = kflat.index_select(0, kv_rows).view(-1, c * b, d)
            vv = vflat.index_select(0, kv_rows).view(-1, c * b, d)
            scores = torch.bmm(qb.index_select(0, pairs), kk.transpose(1, 2))   # [P, B, C*B]
            is_diag = ids[:, -1] == first + pairs % nqb                  # only the last slot can be
            if bool(is_diag.all()):
                scores[:, :, -b:].masked_fill_(future, float("-inf"))
            elif bool(is_diag.any()):
                scores[:, :, -b:].masked_fill_(future & is_diag[:, None, None], float("-inf"))
            out.index_copy_(0, pairs, torch.bmm(torch.softmax(scores, dim=-1), vv))
        start += n
    out = out.view(hq, nqb * b, d)[:, front:front + lq]
    return out.transpose(0, 1).to(q.dtype)
