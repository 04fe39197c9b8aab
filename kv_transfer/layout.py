"""KV layout, per-transfer metadata and the handshake check.

Both ends of a transfer describe their paged KV cache with a `KVLayout`. The cache of one
worker is a single contiguous tensor

    kv: [num_layers, 2 (key, value), num_blocks, block_size, num_kv_heads, head_dim]

and token slot `t` of a sequence lives at block `block_ids[t // block_size]`, offset
`t % block_size`. Two workers may exchange KV only when every field of their layouts and the
protocol version agree; `check_compatible` names the first field that differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch

PROTOCOL_VERSION = 1


class HandshakeError(RuntimeError):
    """The two ends disagree on the protocol version or on the KV layout."""


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"KVLayout.dtype: unknown dtype {dtype!r}")
    return name


@dataclass(frozen=True)
class KVLayout:
    """Shape and type of one worker's paged KV cache (see module docstring)."""

    model_id: str
    dtype: str  # a torch dtype name, e.g. "float16"; a torch.dtype is accepted and normalised
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def compat_hash(self) -> str:
        """sha256 of every field plus PROTOCOL_VERSION; stable across processes and runs."""
        fields = dataclasses.asdict(self) | {"protocol_version": PROTOCOL_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_blocks_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of one layer's K and V for `num_blocks` blocks: [2, n, block_size, Hkv, D]."""
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

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

    def check_cache(self, kv: torch.Tensor) -> None:
        """Raise ValueError unless `kv` is a contiguous cache tensor of this layout."""
        if kv.dim() != 6 or tuple(kv.shape) != self.cache_shape(kv.shape[2]):
            raise ValueError(f"cache shape {tuple(kv.shape)} does not match {self}")
        if kv.dtype != self.torch_dtype:
            raise ValueError(f"cache dtype {kv.dtype} does not match layout dtype {self.dtype}")
        if not kv.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous")


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raise HandshakeError naming the first field where `remote` differs from `local`."""
    for f in dataclasses.fields(KVLayout):
        mine, theirs = getattr(local, f.name), getattr(remote, f.name)
        if mine != theirs:
            raise HandshakeError(
                f"KV layout mismatch: field {f.name!r} differs (local={mine!r}, remote={theirs!r})"
            )


@dataclass(frozen=True)
class PayloadSpec:
    """A named extra tensor that travels with a transfer (e.g. image embeddings)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class TransferMetadata:
    """What both ends agree on for one request's transfer; built by the receiver in prepare().

    Items of a transfer are its layers `layer_start..layer_end-1` followed by its payloads, in
    that order; item index `i` < num_layers is layer `layer_start + i`.
    """

    request_id: str
    layout_hash: str
    dst_block_ids: tuple[int, ...]
    num_tokens: int
    layer_start: int
    layer_end: int  # exclusive
    payloads: tuple[PayloadSpec, ...] = ()
    src_block_ids: tuple[int, ...] = ()  # optional, filled in by the sender for its own records
    protocol_version: int = PROTOCOL_VERSION

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_end)

    @property
    def num_items(self) -> int:
        return len(self.layers) + len(self.payloads)

    def payload_index(self, name: str) -> int:
        for i, spec in enumerate(self.payloads):
            if spec.name == name:
                return len(self.layers) + i
        raise KeyError(f"request {self.request_id!r} has no payload {name!r}")

    def check_against(self, layout: KVLayout) -> None:
        """Raise HandshakeError unless this metadata was made for `layout` and this protocol."""
        if self.protocol_version != PROTOCOL_VERSION:
            raise HandshakeError(
                f"field 'protocol_version' differs (local={PROTOCOL_VERSION}, "
                f"remote={self.protocol_version})"
            )
        if self.layout_hash != layout.compat_hash():
            raise HandshakeError(
                f"field 'layout_hash' differs (local={layout.compat_hash()[:12]}, "
                f"remote={self.layout_hash[:12]})"
            )


@dataclass(frozen=True)
class TransferDescriptor:
    """Everything a sender needs for one request; picklable, passed through Ray by the router.

    `endpoint` is a backend-specific frozen dataclass (segment names, store address, ...).
    `layout` is the receiver's layout, so a mismatch can name the field that differs.
    """

    backend: str
    meta: TransferMetadata
    layout: KVLayout
    endpoint: object
