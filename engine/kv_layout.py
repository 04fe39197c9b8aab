"""The geometry of a paged KV cache, described once: the engine's cache, every KV transport and
the profiler read it from the `KVLayout` built by `KVLayout.from_model_config`.

One worker's cache is a single contiguous tensor

    kv: [num_layers, 2 (0 = key, 1 = value), num_blocks, block_size, num_kv_heads, head_dim]

Token position `p` of a sequence with block table `t` lives at block `t[p // block_size]`,
offset `p % block_size`; flattened over (block, offset) that is the slot

    slot = t[p // block_size] * block_size + p % block_size

so `kv[layer, i].view(-1, num_kv_heads, head_dim)[slot]` is its key (i = 0) or value (i = 1).
`KVLayout.slots` is the only code that computes slots.

The number of blocks is not part of the layout: two workers with the same layout and different
pool sizes can exchange KV (kv_transfer checks every field of the layout at handshake).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


def dtype_name(dtype: torch.dtype | str, field: str = "KVLayout.dtype") -> str:
    """'float16' for torch.float16 or 'float16'; ValueError naming `field` for anything else."""
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"{field}: unknown dtype {dtype!r}")
    return name


@dataclass(frozen=True)
class KVLayout:
    """Shape and type of one worker's paged KV cache (see module docstring).

    Every field takes part in kv_transfer's compatibility hash: adding one changes the wire
    handshake (kv_transfer.layout.PROTOCOL_VERSION)."""

    model_id: str
    dtype: str  # a torch dtype name, e.g. "float16"; a torch.dtype is accepted and normalised
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    kv_head_start: int = 0  # the model's first KV head held here (tensor-parallel ranks hold a range)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not isinstance(self.kv_head_start, int) or self.kv_head_start < 0:
            raise ValueError(f"KVLayout.kv_head_start must be a non-negative int, got {self.kv_head_start!r}")

    @classmethod
    def from_model_config(cls, config, *, model_id: str, dtype: torch.dtype | str, block_size: int) -> KVLayout:
        """The layout of a Hugging Face decoder config: head_dim is the config's own when it
        has one (Gemma, Qwen3), else hidden_size / num_attention_heads; without
        num_key_value_heads the model has no GQA (as many KV heads as query heads)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(model_id, dtype, config.num_hidden_layers, kv_heads, head_dim, block_size)

    @property
    def kv_heads(self) -> range:
        """The model's KV heads this cache holds: all of them, or a tensor-parallel rank's range."""
        return range(self.kv_head_start, self.kv_head_start + self.num_kv_heads)

    def with_heads(self, heads: range) -> KVLayout:
        """The same cache holding KV heads `heads` (a rank's part, or the whole of a group's)."""
        return dataclasses.replace(self, num_kv_heads=len(heads), kv_head_start=heads.start)

    # ------------------------------------------------------------ types and sizes
    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K plus V of one token across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize

    def bytes_per_block_layer(self) -> int:
        """Bytes of K plus V of one block in one layer."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers."""
        return self.num_layers * self.bytes_per_block_layer()

    def bytes_per_layer(self, num_blocks: int) -> int:
        return num_blocks * self.bytes_per_block_layer()

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ------------------------------------------------------------ tensors
    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_blocks_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's K and V for `num_blocks` blocks: [2, n, block_size, Hkv, D]."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def new_cache(self, num_blocks: int, device: torch.device | str | None = None) -> torch.Tensor:
        """A zeroed cache tensor of `num_blocks` blocks (transports that need the cache in
        memory of their own, e.g. shared memory, make it themselves and check it)."""
        return torch.zeros(self.cache_shape(num_blocks), dtype=self.torch_dtype, device=device)

    def check_cache(self, kv: torch.Tensor) -> None:
        """Raise ValueError unless `kv` is a contiguous cache tensor of this layout."""
        if kv.dim() != 6 or tuple(kv.shape) != self.cache_shape(kv.shape[2]):
            raise ValueError(f"cache shape {tuple(kv.shape)} does not match {self}")
        if kv.dtype != self.torch_dtype:
            raise ValueError(f"cache dtype {kv.dtype} does not match layout dtype {self.dtype}")
        if not kv.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous")

    # ------------------------------------------------------------ slots
    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end) of a sequence (module docstring).

        `block_table` must cover position end - 1. Built block by block (one range per block),
        so a long prompt costs a few list extends, a decode row one."""
        bs = self.block_size
        out: list[int] = []
        for b in range(start // bs, -(-end // bs)):
            first = b * bs
            base = block_table[b] * bs - first
            out.extend(range(base + max(start, first), base + min(end, first + bs)))
        return out
