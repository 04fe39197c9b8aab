"""Sparse prefill attention: block indexes (FlexPrefill, static), a Triton kernel (CUDA) and a
batched torch implementation (CPU) of one contract, plus a dense fallback for short prompts.

The engine's attention backend calls `sparse_prefill_attention`; Triton is imported only when a
CUDA tensor reaches the kernel. The settings (SparseMethod, SparsePrefillConfig, config.py)
import without torch, so the deploy schema can build them; every other name here loads its
module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import SparseConfigError, SparseMethod, SparsePrefillConfig

if TYPE_CHECKING:
    from .block_index import BlockIndex, causal_block_mask, num_key_blocks, num_query_blocks
    from .flexprefill import FlexPrefillResult, flexprefill_index
    from .prefill import SparsePrefillStats, block_sparse_attention, build_index, sparse_prefill_attention
    from .quality import attention_mass_kept
    from .static_pattern import static_index

_LAZY = {
    "BlockIndex": "block_index",
    "causal_block_mask": "block_index",
    "num_key_blocks": "block_index",
    "num_query_blocks": "block_index",
    "FlexPrefillResult": "flexprefill",
    "flexprefill_index": "flexprefill",
    "SparsePrefillStats": "prefill",
    "block_sparse_attention": "prefill",
    "build_index": "prefill",
    "sparse_prefill_attention": "prefill",
    "attention_mass_kept": "quality",
    "static_index": "static_pattern",
}


def __getattr__(name: str) -> Any:
    """Load a torch-side name on first use; kept as a module attribute afterwards (so it can be
    patched, as bench/sparse_speed.py's DensityProbe does)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BlockIndex",
    "FlexPrefillResult",
    "SparseConfigError",
    "SparseMethod",
    "SparsePrefillConfig",
    "SparsePrefillStats",
    "attention_mass_kept",
    "block_sparse_attention",
    "build_index",
    "causal_block_mask",
    "flexprefill_index",
    "num_key_blocks",
    "num_query_blocks",
    "sparse_prefill_attention",
    "static_index",
]
