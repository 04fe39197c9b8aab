"""Sparse prefill attention entry point: choose dense or a block index, then run the kernel.

    sparse_prefill_attention(q, k, v, q_offset, scale, config) -> (out, stats)

    Lk < config.dense_below or method "dense"  -> dense causal SDPA
    method "static"                             -> sink + local + power-of-two blocks
    method "flexprefill"                        -> per-head FlexPrefill selection
    then block_sparse_attention(): Triton kernel on CUDA, batched torch on CPU.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .block_index import BlockIndex
from .dense import dense_causal_attention
from .flexprefill import flexprefill_index
from .static_pattern import static_index
from .torch_impl import block_sparse_attention_torch


class SparseMethod(str, enum.Enum):
    DENSE = "dense"
    FLEXPREFILL = "flexprefill"
    STATIC = "static"


@dataclass(frozen=True)
class SparsePrefillConfig:
    """method: "dense" | "flexprefill" | "static"; block_size: index block (tokens);
    gamma: cumulative attention to keep (FlexPrefill); tau: JS-distance threshold below which a
    head uses the query-aware pattern; min_budget: key tokens per query block at least;
    dense_below: prompts (Lk) shorter than this run dense; sink/local: static pattern blocks."""

    method: SparseMethod = SparseMethod.FLEXPREFILL
    block_size: int = 128
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 512
    dense_below: int = 4096
    sink: int = 1
    local: int = 4

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "method", SparseMethod(self.method))
        except ValueError:
            raise ValueError(f"SparsePrefillConfig.method: {self.method!r} is not one of "
                             f"{[m.value for m in SparseMethod]}") from None
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"SparsePrefillConfig.block_size: {self.block_size} must be a "
                             f"power of two >= 16")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"SparsePrefillConfig.gamma: {self.gamma} must be in (0, 1]")
        if self.tau < 0.0:
            raise ValueError(f"SparsePrefillConfig.tau: {self.tau} must be >= 0")
        for name in ("min_budget", "dense_below", "sink"):
            if getattr(self, name) < 0:
                raise ValueError(f"SparsePrefillConfig.{name}: must be >= 0")
        if self.local < 1:
            raise ValueError(f"SparsePrefillConfig.local: {self.local} must be >= 1")


@dataclass(frozen=True)
class SparsePrefillStats:
    method: SparseMethod       # what ran (DENSE when Lk < dense_below)
    backend: str               # "sdpa" | "torch" | "triton"
    density: float             # fraction of causal (head, q block, k block) computed; 1.0 dense
    patterns: tuple[str, ...]  # per q head: "dense" | "static" | "query_aware" | "vertical_slash"


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: BlockIndex,
                           scale: float) -> tuple[torch.Tensor, str]:
    """Run an index with the device's implementation -> (out [Lq, Hq, D], backend name)."""
    if q.is_cuda:
        from .triton_kernel import block_sparse_attention_triton
        return block_sparse_attention_triton(q, k, v, index, scale), "triton"
    return block_sparse_attention_torch(q, k, v, index, scale), "torch"


def build_index(q: torch.Tensor, k: torch.Tensor, q_offset: int, scale: float,
                config: SparsePrefillConfig) -> tuple[BlockIndex, tuple[str, ...]]:
    """The block index `config` selects (method static or flexprefill) and per-head patterns."""
    hq = q.shape[1]
    lk = k.shape[0]
    if config.method is SparseMethod.STATIC:
        index = static_index(hq, q_offset, lk, config.block_size, config.sink, config.local,
                             q.device)
        return index, ("static",) * hq
    if config.method is SparseMethod.FLEXPREFILL:
        res = flexprefill_index(q, k, q_offset, scale, config.block_size, config.gamma,
                                config.tau, config.min_budget)
        patterns = tuple("query_aware" if qa else "vertical_slash"
                         for qa in res.query_aware.tolist())
        return res.index, patterns
    raise ValueError(f"no block index for method {config.method.value}")


def sparse_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                             scale: float, config: SparsePrefillConfig
                             ) -> tuple[torch.Tensor, SparsePrefillStats]:
    """q [Lq, Hq, D]; k/v [Lk, Hkv, D], the sequence's whole key range (Lk = q_offset + Lq);
    Hq % Hkv == 0, kv head of q head h is h // (Hq // Hkv). -> (out [Lq, Hq, D], stats)."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    if lk != q_offset + lq or hq % hkv or v.shape != k.shape:
        raise ValueError(f"bad shapes: q={tuple(q.shape)} k={tuple(k.shape)} "
                         f"v={tuple(v.shape)} q_offset={q_offset}")
    if config.method is SparseMethod.DENSE or lk < config.dense_below:
        out = dense_causal_attention(q, k, v, q_offset, scale)
        return out, SparsePrefillStats(SparseMethod.DENSE, "sdpa", 1.0, ("dense",) * hq)
    index, patterns = build_index(q, k, q_offset, scale, config)
    out, backend = block_sparse_attention(q, k, v, index, scale)
    return out, SparsePrefillStats(config.method, backend, index.density(), patterns)
