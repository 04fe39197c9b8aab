"""FlexPrefill block selection (Lai et al., ICLR 2025), batched over heads.

Per query head, from the LAST query block (rows R <= B of it):
  A      = softmax(q_last K^T * scale) with causal mask            [Hq, R, Lk]  (true attention)
  a_bar  = mean over rows of A summed per key block               [Hq, NKB]
  a_hat  = softmax(mean(q_last) . mean-pooled K^T * scale)         [Hq, NKB]    (estimate)
  d_js   = sqrt(JSD(a_hat || a_bar))
  d_js < tau  -> query-aware head: estimate the whole block matrix from mean-pooled q and k,
                 keep the highest blocks until the kept estimated mass >= gamma (over the whole
                 flattened matrix, every query block row normalised to 1).
  otherwise   -> vertical-slash head: from A, vertical scores (column sums) and slash scores
                 (sums along diagonals, offset o = query pos - key pos), pooled to key blocks
                 and to block distances floor(o/B); keep the top key blocks and the top
                 distances until each covers >= gamma. A kept key block is kept in every query
                 block row, a kept distance d keeps distances d and d+1 (offsets in
                 [dB, (d+1)B) straddle both). Block granularity (not token columns mapped to
                 blocks) keeps the guarantee at a far lower density.
Then for every head: the sink block (kb 0) and the diagonal block are always kept, and every
query block gets at least ceil(min_budget / B) key blocks (top scores of its pattern), capped by
causality. Last, the last query block keeps every key block: its rows produce the first token,
and they cost only 1 / NQB of the causal blocks (on SmolLM2-135M needle prompts, without this
rule the answer was lost at 0.68 density; with it the greedy text equals dense). Both patterns are computed for all heads and chosen with torch.where: no head loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_index import BlockIndex, causal_block_mask, num_key_blocks

# The last block's attention A is computed in head chunks (whole GQA groups) of at most this
# many elements: 16 MiB of fp32, under glibc's largest mmap threshold (32 MiB), so the chunks'
# buffers are reused from the heap instead of being mapped and page-faulted afresh for every
# op (_last_block_stats at 8K, SmolLM2 heads, one thread: 81 ms as one chunk of all 9
# heads, 58 ms in per-group chunks).
_MAX_LAST_BLOCK_ELEMS = 1 << 22


@dataclass(frozen=True)
class FlexPrefillResult:
    index: BlockIndex
    query_aware: torch.Tensor  # bool [Hq]: True = query-aware block pattern, else vertical-slash
    js_distance: torch.Tensor  # fp32 [Hq]
    estimated_mass: torch.Tensor  # fp32 [Hq]: query-aware: estimated block mass kept (pooled
    # estimate); vertical-slash: the last query block's true
    # attention mass inside its kept blocks. Both >= gamma.


def _keep_top_until(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """scores [H, N] >= 0, rows summing to 1 -> bool [H, N]: the fewest top entries whose sum
    reaches gamma (all entries when gamma >= total)."""
    vals, order = torch.sort(scores, dim=-1, descending=True)
    before = torch.cumsum(vals, dim=-1) - vals
    keep_sorted = before < gamma
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _pool_rows(x: torch.Tensor, start: int, block_size: int, num_blocks: int) -> torch.Tensor:
    """x [L, H, D] whose row 0 sits at absolute position `start` -> mean over the valid rows of
    each absolute block, [H, num_blocks, D] (blocks from start // B)."""
    length, heads, d = x.shape
    front = start % block_size
    pad = x.new_zeros(num_blocks * block_size, heads, d, dtype=torch.float32)
    pad[front : front + length] = x.float()
    sums = pad.view(num_blocks, block_size, heads, d).sum(1)
    valid = torch.zeros(num_blocks * block_size, device=x.device)
    valid[front : front + length] = 1
    n = valid.view(num_blocks, block_size).sum(1).clamp(min=1)
    return (sums / n[:, None, None]).transpose(0, 1)


def _last_block_stats(
    q_last: torch.Tensor, k: torch.Tensor, last_pos0: int, scale: float, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_last [R, Hq, D] (row 0 at absolute last_pos0), k [Lk, Hkv, D] -> per head, from the
    true attention A of these rows: a_bar [Hq, NKB] (row-mean mass per key block), vertical
    scores [Hq, Lk] (row-mean column mass) and slash scores [Hq, Lk] (row-mean mass at offset
    o = query pos - key pos). Each sums to 1 per head."""
    r, hq, d = q_last.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    nkb = num_key_blocks(lk, block_size)
    dev = q_last.device
    pos = torch.arange(last_pos0, last_pos0 + r, device=dev)
    keys = torch.arange(lk, device=dev)
    future = keys[None, :] > pos[:, None]  # [R, Lk]
    offsets = (pos[:, None] - keys[None, :]).clamp(min=0).reshape(-1)  # [R*Lk]
    kt = k.float().permute(1, 2, 0)  # [Hkv, D, Lk]
    heads_per_chunk = max(group, (_MAX_LAST_BLOCK_ELEMS // (r * lk)) // group * group)
    out = {"a_bar": [], "v": [], "s": []}
    for h0 in range(0, hq, heads_per_chunk):
        h1 = min(hq, h0 + heads_per_chunk)
        ql = (q_last[:, h0:h1].float() * scale).permute(1, 0, 2).reshape((h1 - h0) // group, group * r, d)
        s = torch.bmm(ql, kt[h0 // group : h1 // group]).view(h1 - h0, r, lk)
        a = torch.softmax(s.masked_fill_(future, float("-inf")), dim=-1)  # [Hc, R, Lk]
        vert = a.sum(1) / r
        slash = (
            torch.zeros(h1 - h0, lk, device=dev).scatter_add_(1, offsets.expand(h1 - h0, -1), a.view(h1 - h0, -1)) / r
        )
        blocks = torch.nn.functional.pad(vert, (0, nkb * block_size - lk))
        out["a_bar"].append(blocks.view(h1 - h0, nkb, block_size).sum(-1))
        out["v"].append(vert)
        out["s"].append(slash)
    a_bar, vert, slash = (torch.cat(out[n]) for n in ("a_bar", "v", "s"))
    return a_bar, vert, slash


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    eps = 1e-12
    m = 0.5 * (p + q)
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(-1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0).sqrt()


def flexprefill_index(
    q: torch.Tensor,
    k: torch.Tensor,
    q_offset: int,
    scale: float,
    block_size: int,
    gamma: float,
    tau: float,
    min_budget: int,
) -> FlexPrefillResult:
    """q [Lq, Hq, D], k [Lk, Hkv, D] with Lk = q_offset + Lq -> FlexPrefillResult.
    min_budget is in key tokens per query block (rounded up to blocks)."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    b = block_size
    group = hq // hkv
    dev = q.device
    nkb = num_key_blocks(lk, b)
    first = q_offset // b
    nqb = nkb - first
    causal = causal_block_mask(q_offset, lk, b, dev)  # [NQB, NKB]
    absq = torch.arange(first, nkb, device=dev)
    kbs = torch.arange(nkb, device=dev)
    dist = (absq[:, None] - kbs[None, :]).clamp(min=0)  # [NQB, NKB]

    # Last query block: true vs estimated block distributions, vertical and slash scores.
    last_pos0 = max((nkb - 1) * b, q_offset)
    q_last = q[last_pos0 - q_offset :]
    a_bar, vert, slash = _last_block_stats(q_last, k, last_pos0, scale, b)
    k_pool = _pool_rows(k, 0, b, nkb)  # [Hkv, NKB, D]
    q_last_pool = q_last.float().mean(0).view(hkv, group, d)
    a_hat = torch.softmax(torch.bmm(q_last_pool, k_pool.transpose(1, 2)) * scale, -1)
    js = _js_distance(a_hat.reshape(hq, nkb), a_bar)
    query_aware = js < tau

    # Query-aware pattern from the pooled estimate of the whole block matrix.
    q_pool = _pool_rows(q, q_offset, b, nqb)  # [Hq, NQB, D]
    est = torch.bmm(q_pool.reshape(hkv, group * nqb, d), k_pool.transpose(1, 2)) * scale
    est = torch.softmax(est.view(hq, nqb, nkb).masked_fill(~causal, float("-inf")), -1)
    qa_mask = _keep_top_until(est.view(hq, -1) / nqb, gamma).view(hq, nqb, nkb)

    # Vertical-slash pattern, selected at block granularity (the kernel's unit): key blocks by
    # pooled column mass, block distances by pooled diagonal mass. Offsets o in [dB, (d+1)B)
    # touch block distances d and d+1, so a kept distance d keeps both.
    o = torch.arange(lk, device=dev)
    v_score = torch.nn.functional.pad(vert, (0, nkb * b - lk)).view(hq, nkb, b).sum(-1)
    s_score = torch.zeros(hq, nkb + 1, device=dev).scatter_add_(1, (o // b).expand(hq, -1), slash)
    v_blocks = _keep_top_until(v_score, gamma)
    s_sel = _keep_top_until(s_score, gamma)
    s_blocks = s_sel.clone()
    s_blocks[:, 1:] |= s_sel[:, :-1]
    vs_mask = v_blocks[:, None, :] | s_blocks[:, dist]
    vs_score = v_score[:, None, :] + s_score[:, dist]

    qa = query_aware[:, None, None]
    mask = torch.where(qa, qa_mask, vs_mask)
    score = torch.where(qa, est, vs_score).masked_fill(~causal, float("-inf"))

    # Always: sink and diagonal; at least min_budget tokens per query block.
    mask = mask | (kbs == 0) | (dist == 0)  # non-causal entries dropped below
    k_min = min(nkb, -(-min_budget // b))
    if k_min > 0:
        top = torch.topk(score, k_min, dim=-1).indices
        mask = mask.scatter(-1, top, True)
    mask = mask & causal

    qa_kept = (est * mask).sum((1, 2)) / nqb
    vs_kept = (a_bar * mask[:, -1]).sum(-1)
    kept = torch.where(query_aware, qa_kept, vs_kept)
    mask[:, -1] = causal[-1]  # after `kept`: that reports the selection's own mass
    index = BlockIndex.from_mask(mask, b, q_offset, lk)
    return FlexPrefillResult(index, query_aware, js, kept)
