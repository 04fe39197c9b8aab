"""Block-sparse prefill attention forward kernel in Triton (one sequence; GQA; query offset).

Contract (same as torch_impl.block_sparse_attention_torch):
    q [Lq, Hq, D], k/v [Lk, Hkv, D] (any strides with unit stride on D), index: BlockIndex
    out [Lq, Hq, D] in q's dtype; query row i sits at absolute position q_offset + i; kv head
    of q head h is h // (Hq // Hkv) (pointer arithmetic, no KV copies); fp32 online softmax.

Grid: (query tiles, Hq). Query tiles are BLOCK_M rows inside one index block (BLOCK_M divides
the index block size B); each listed key block is swept in B // BLOCK_N sub-tiles. Tiles are
launched last-block-first so the longest rows start early. Only plain pointer arithmetic is used
(tl.make_block_ptr is gone in Triton 3.9).

Triton is imported lazily and the kernel is built on first use, so CPU-only callers never need
Triton. To run under the interpreter, TRITON_INTERPRET=1 must be in the environment before
Triton is first imported in the process (triton.language's own jit helpers are built at import);
the unit tests therefore run the kernel in a subprocess. fp32/fp16 only there: bf16 is wrong in
the interpreter.
"""

from __future__ import annotations

import functools

import torch

from .block_index import BlockIndex

_LOG2E = 1.4426950408889634


@functools.cache
def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _block_sparse_fwd(
        Q,
        K,
        V,
        O,
        IDS,
        CNT,
        qk_scale,
        stride_qm,
        stride_qh,
        stride_km,
        stride_kh,
        stride_vm,
        stride_vh,
        stride_om,
        stride_oh,
        stride_ih,
        stride_iq,
        stride_ch,
        Lq,
        Lk,
        q_offset,
        q_start,
        n_tiles,
        GROUP: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        tile = n_tiles - 1 - tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        qblk = tile // (BLOCK // BLOCK_M)  # query block (relative to the index)

        offs_m = q_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # absolute positions
        rows = offs_m - q_offset
        row_ok = (rows >= 0) & (rows < Lq)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_last = q_start + tile * BLOCK_M + BLOCK_M - 1

        q_ptrs = Q + rows[:, None] * stride_qm + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        cnt = tl.load(CNT + h * stride_ch + qblk)
        id_base = IDS + h * stride_ih + qblk * stride_iq
        k_base = K + kvh * stride_kh + offs_d[None, :]
        v_base = V + kvh * stride_vh + offs_d[None, :]
        for s in range(0, cnt):
            kb = tl.load(id_base + s)
            for sub in tl.static_range(BLOCK // BLOCK_N):
                n_start = kb * BLOCK + sub * BLOCK_N
                if n_start <= m_last:  # skip sub-tiles wholly in the future
                    offs_n = n_start + tl.arange(0, BLOCK_N)
                    n_ok = offs_n < Lk
                    k = tl.load(k_base + offs_n[:, None] * stride_km, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                    if IEEE:
                        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
                    else:
                        qk = tl.dot(q, tl.trans(k))
                    qk = qk * qk_scale  # log2 domain: exp2 below
                    keep = (offs_n[None, :] <= offs_m[:, None]) & n_ok[None, :]
                    qk = tl.where(keep, qk, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(qk, 1))
                    # A row that has seen no key yet keeps m = -inf; use 0 to avoid inf - inf.
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    p = tl.math.exp2(qk - m_safe[:, None])
                    alpha = tl.math.exp2(m_i - m_safe)
                    l_i = l_i * alpha + tl.sum(p, 1)
                    v = tl.load(v_base + offs_n[:, None] * stride_vm, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
                    if IEEE:
                        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                    else:
                        pv = tl.dot(p.to(v.dtype), v)
                    acc = acc * alpha[:, None] + pv
                    m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows with no key give 0
        out = acc / l_safe[:, None]
        o_ptrs = O + rows[:, None] * stride_om + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return _block_sparse_fwd


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockIndex,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D]. block_m/block_n must divide
    index.block_size (defaults: min(B, 128) rows, min(B, 64) keys)."""
    lq, hq, d = q.shape
    lk, hkv, _ = k.shape
    b = index.block_size
    if lk != index.kv_len or lk - lq != index.q_offset or hq != index.num_heads:
        raise ValueError(
            f"shapes q={tuple(q.shape)} k={tuple(k.shape)} do not match the index "
            f"(Hq={index.num_heads}, q_offset={index.q_offset}, Lk={index.kv_len})"
        )
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    block_m = block_m or min(b, 128)
    block_n = block_n or min(b, 64)
    if b % block_m or b % block_n or min(block_m, block_n) < 16:
        raise ValueError(f"block_m={block_m}, block_n={block_n} must be >= 16 and divide B={b}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v need unit stride on the head dimension")
    ids = index.block_ids.to(device=q.device, dtype=torch.int32).contiguous()
    counts = index.counts.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    n_tiles = ids.shape[1] * (b // block_m)
    if num_warps is None:
        num_warps = 8 if block_m * max(d, 64) >= 128 * 128 else 4
    if num_stages is None:
        num_stages = 2
    import triton

    kernel = _build_kernel()
    kernel[(n_tiles, hq)](
        q,
        k,
        v,
        out,
        ids,
        counts,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        ids.stride(0),
        ids.stride(1),
        counts.stride(0),
        lq,
        lk,
        index.q_offset,
        index.first_q_block * b,
        n_tiles,
        GROUP=hq // hkv,
        BLOCK=b,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(max(d, 16)),
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
