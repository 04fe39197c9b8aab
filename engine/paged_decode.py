"""Paged decode attention: one query token per sequence, attending over its paged KV cache in place.

Contract (the Triton kernel and the torch reference alike):
    q             [S, Hq, D]   the decode token of each of S sequences (unit stride on D)
    k_cache/v_cache [num_blocks, block_size, Hkv, D]  one layer's K / V in the engine's layout
                  (engine/kv_layout.py: `kv[layer, 0]` and `kv[layer, 1]`, views, never copied)
    block_tables  [S, max_blocks] int32  token p of sequence s lives at block
                  block_tables[s, p // block_size], offset p % block_size; entries past the
                  sequence's last block are never read (any value)
    context_lens  [S] int32  tokens of sequence s in the cache, this step's included; >= 1
    out           [S, Hq, D] in q's dtype: softmax(scale * q·k) v over positions < context_lens[s];
                  query head h reads KV head h // (Hq // Hkv)

The kernel is one launch for every sequence, whatever their lengths: grid (S, Hkv, splits). A
program holds the Hq / Hkv query heads of one KV head (padded to 16 rows for tl.dot), so each
K/V tile is loaded once per group, and sweeps its positions BLOCK_N tokens at a time: each token's
block id comes from the table, so the cache is read where it lies (no gather, no padding to the
longest sequence). Softmax is online in fp32 (log2 domain). With splits > 1 (few sequences, long
contexts: not enough programs to fill the GPU) each program takes a contiguous share of the
positions and writes its normalised partial output and log-sum-exp; a few torch ops merge them.

Triton is imported lazily and the kernel built on first use, so CPU-only callers never need it.
Under the interpreter (TRITON_INTERPRET=1, set before Triton is first imported; the unit tests use
a subprocess, see tests/unit/test_paged_decode_triton.py) fp32 is exact enough to test against the
torch path; bf16 is wrong there.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

_LOG2E = 1.4426950408889634


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The reference (module docstring contract): gather every row's blocks into one padded
    tensor and run one masked SDPA call, as engine/attention.py's decode buckets do on CPU."""
    s, nb = block_tables.shape
    bs, hkv, d = k_cache.shape[1:]
    lens = context_lens.to(torch.long)
    used = torch.arange(nb, device=q.device)[None, :] * bs < lens[:, None]
    ids = torch.where(used, block_tables.to(torch.long), 0).flatten()  # unread entries -> block 0
    kd = k_cache.index_select(0, ids).view(s, nb * bs, hkv, d).transpose(1, 2)  # [S, Hkv, L, D]
    vd = v_cache.index_select(0, ids).view(s, nb * bs, hkv, d).transpose(1, 2)
    mask = (torch.arange(nb * bs, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(2)


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_decode_fwd(
        Q,
        K,
        V,
        O,
        PART,
        LSE,
        TABLES,
        LENS,
        qk_scale,
        num_splits,
        stride_qs,
        stride_qh,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_vb,
        stride_vt,
        stride_vh,
        stride_os,
        stride_oh,
        stride_ts,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        PAGE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        s = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        ctx = tl.load(LENS + s)

        offs_g = tl.arange(0, BLOCK_G)
        g_ok = offs_g < GROUP
        heads = kvh * GROUP + offs_g
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(
            Q + s * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )

        # This program's positions [lo, hi): a BLOCK_N-aligned share of the sequence.
        chunk = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, ctx)

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        table = TABLES + s * stride_ts
        k_head = K + kvh * stride_kh + offs_d[None, :]
        v_head = V + kvh * stride_vh + offs_d[None, :]
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            blk = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
            tok = offs_n % PAGE
            kv_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_head + blk[:, None] * stride_kb + tok[:, None] * stride_kt, mask=kv_ok, other=0.0)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
            # Every tile holds at least one position < hi, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + blk[:, None] * stride_vb + tok[:, None] * stride_vt, mask=kv_ok, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a program with no positions writes 0
        out = acc / l_safe[:, None]
        out_ok = g_ok[:, None] & d_ok[None, :]
        if SPLIT:
            # PART [S, Hq, splits, D] fp32, LSE [S, Hq, splits] (log2 domain; -inf when empty).
            row = (s * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
            tl.store(PART + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_ok)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
            tl.store(LSE + row, lse, mask=g_ok)
        else:
            o_ptrs = O + s * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=out_ok)

    return _paged_decode_fwd


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(num_seqs: int, num_kv_heads: int, max_tokens: int, block_n: int, device: torch.device) -> int:
    """Splits that bring the grid to about two programs per SM, each keeping at least 4 tiles;
    1 when the sequences alone fill the GPU, on CPU, or when contexts are short. `max_tokens`
    bounds the longest context from shapes only (block_tables width x block_size): no host sync."""
    if device.type != "cuda":
        return 1
    programs = num_seqs * num_kv_heads
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = math.ceil(max_tokens / block_n)
    if programs >= sms or tiles < 8:
        return 1
    return max(1, min(math.ceil(2 * sms / programs), tiles // 4, 16))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """The Triton kernel (module docstring contract). block_n: positions per tile, a power of two
    >= 16 (default 64, at most the padded table width); num_splits: programs per (sequence, KV head)
    (default `default_num_splits`)."""
    s, hq, d = q.shape
    _, page, hkv, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d:
        raise ValueError(
            f"cache shapes k={tuple(k_cache.shape)} v={tuple(v_cache.shape)} do not fit q={tuple(q.shape)}"
        )
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    if block_tables.shape[0] != s or context_lens.shape != (s,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} / context_lens {tuple(context_lens.shape)} "
            f"do not have one row per sequence ({s})"
        )
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("block_tables and context_lens must be int32")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the caches need unit stride on the head dimension")
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    context_lens = context_lens.contiguous()
    import triton

    max_tokens = block_tables.shape[1] * page
    block_n = block_n or min(64, max(16, triton.next_power_of_2(max_tokens)))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two >= 16")
    if num_splits is None:
        num_splits = default_num_splits(s, hkv, max_tokens, block_n, q.device)
    group = hq // hkv
    out = torch.empty((s, hq, d), dtype=q.dtype, device=q.device)
    if s == 0:
        return out
    split = num_splits > 1
    # Without splits PART / LSE are never touched (one element each: a launch needs real pointers).
    part = torch.empty((s, hq, num_splits, d) if split else (1,), dtype=torch.float32, device=q.device)
    lse = torch.empty((s, hq, num_splits) if split else (1,), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(max(d, 16))
    _build_kernel()[(s, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        part,
        lse,
        block_tables,
        context_lens,
        scale * _LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        PAGE=page,
        BLOCK_N=block_n,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        SPLIT=split,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps or 4,
    )
    if split:
        # Weights of each split's partial output: softmax of the log-sum-exps (base 2).
        w = torch.softmax(lse * math.log(2.0), dim=-1)
        out.copy_((w.unsqueeze(-1) * part).sum(-2))
    return out
