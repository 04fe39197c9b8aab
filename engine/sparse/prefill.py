"""Sparse prefill attention entry point: choose dense or a block index, then run the kernel.

    sparse_prefill_attention(q, k, v, q_offset, scale, config) -> (out, stats)

    Lk < config.dense_below or method "dense"  -> dense causal SDPA
    method "static"                             -> sink + local + power-of-two blocks
    method "flexprefill"                        -> per-head FlexPrefill selection
    then block_sparse_attention(): Triton kernel on CUDA, batched torch on CPU.

The method enum and the settings (SparseMethod, SparsePrefillConfig) live in engine/sparse/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_index import BlockIndex
from .config import SparseMethod, SparsePrefillConfig
from .dense import dense_causal_attention
from .flexprefill import flexprefill_index
from .static_pattern import static_index
from .torch_impl import block_sparse_attention_torch


@dataclass(frozen=True)
class SparsePrefillStats:
    method: SparseMethod  # what ran (DENSE when Lk < dense_below)
    backend: str  # "sdpa" | "torch" | "triton"
    density: float  # fraction of causal (head, q block, k block) computed; 1.0 dense
    patterns: tuple[str, ...]  # per q head: "dense" | "static" | "query_aware" | "vertical_slash"


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex, scale: float
) -> tuple[torch.Tensor, str]:
    """Run an index with the device's implementation -> (out [Lq, Hq, D], backend name)."""
    if q.is_cuda:
        from .triton_kernel import block_sparse_attention_triton

        return block_sparse_attention_triton(q, k, v, index, scale), "triton"
    return block_sparse_attention_torch(q, k, v, index, scale), "torch"


def build_index(
    q: torch.Tensor, k: torch.Tensor, q_offset: int, scale: float, config: SparsePrefillConfig
) -> tuple[BlockIndex, tuple[str, ...]]:
    """The block index `config` selects (method static or flexprefill) and per-head patterns."""
    hq = q.shape[1]
    lk = k.shape[0]
    if config.method is SparseMethod.STATIC:
        index = static_index(hq, q_offset, lk, config.block_size, config.sink, config.local, q.device)
        return index, ("static",) * hq
    if config.method is SparseMethod.FLEXPREFILL:
        res = flexprefill_index(q, k, q_offset, scale, config.block_size, config.gamma, config.tau, config.min_budget)
        patterns = tuple("query_aware" if qa else "vertical_slash" for qa in res.query_aware.tolist())
        return res.index, patterns
    raise ValueError(f"no block index for method {config.method.value}")


def sparse_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float, config: SparsePrefillConfig
) -> tuple[torch.Tensor, SparsePrefillStats]:
    """q [Lq, Hq, D]; k/v [Lk, Hkv, D], the sequence's whole key range (Lk = q_offset + Lq);
    Hq % Hkv == 0, kv head of q head h is h // (Hq // Hkv). -> (out [Lq, Hq, D], stats)."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    if lk != q_offset + lq or hq % hkv or v.shape != k.shape:
        raise ValueError(f"bad shapes: q={tuple(q.shape)} k={tuple(k.shape)} v={tuple(v.shape)} q_offset={q_offset}")
    if config.method is SparseMethod.DENSE or lk < config.dense_below:
        out = dense_causal_attention(q, k, v, q_offset, scale)
        return out, SparsePrefillStats(SparseMethod.DENSE, "sdpa", 1.0, ("dense",) * hq)
    index, patterns = build_index(q, k, q_offset, scale, config)
    out, backend = block_sparse_attention(q, k, v, index, scale)
    return out, SparsePrefillStats(config.method, backend, index.density(), patterns)
