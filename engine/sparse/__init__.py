"""Sparse prefill attention: block indexes (FlexPrefill, static), a Triton kernel (CUDA) and a
batched torch implementation (CPU) of one contract, plus a dense fallback for short prompts.

The engine's attention backend calls `sparse_prefill_attention`; Triton is imported only when a
CUDA tensor reaches the kernel.
"""

from .block_index import BlockIndex, causal_block_mask, num_key_blocks, num_query_blocks
from .flexprefill import FlexPrefillResult, flexprefill_index
from .prefill import (SparseMethod, SparsePrefillConfig, SparsePrefillStats,
                      block_sparse_attention, build_index, sparse_prefill_attention)
from .quality import attention_mass_kept
from .static_pattern import static_index

__all__ = [
    "BlockIndex", "FlexPrefillResult", "SparseMethod", "SparsePrefillConfig",
    "SparsePrefillStats", "attention_mass_kept", "block_sparse_attention", "build_index",
    "causal_block_mask", "flexprefill_index", "num_key_blocks", "num_query_blocks",
    "sparse_prefill_attention", "static_index",
]
