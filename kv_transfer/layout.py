"""Per-transfer metadata and the handshake check.

Both ends of a transfer describe their paged KV cache with the engine's `KVLayout`
(engine/kv_layout.py: the cache tensor's shape and how token positions map to blocks). Two
workers may exchange KV only when every field of their layouts and the protocol version agree:
`check_compatible` names the first field that differs, and every TransferMetadata carries
`compat_hash(layout)` so a sender checks the receiver's layout once more per request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch

from engine.kv_layout import KVLayout, dtype_name

# 2: KVLayout.kv_head_start (the KV heads a tensor-parallel rank holds); 3: several senders per
# transfer and receiving caches spread over ranks (the shm / cuda_ipc endpoint's slots and caches);
# 4: TransferMetadata.first_block (the receiver's prefix cache holds the prompt's first blocks)
PROTOCOL_VERSION = 4


class HandshakeError(RuntimeError):
    """The two ends disagree on the protocol version or on the KV layout."""


def compat_hash(layout: KVLayout) -> str:
    """sha256 of every field of `layout` plus PROTOCOL_VERSION; stable across processes and runs.

    Sent in every TransferMetadata (`layout_hash`) and compared by the sender."""
    fields = dataclasses.asdict(layout) | {"protocol_version": PROTOCOL_VERSION}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raise HandshakeError naming the first field where `remote` differs from `local`."""
    for f in dataclasses.fields(KVLayout):
        mine, theirs = getattr(local, f.name), getattr(remote, f.name)
        if mine != theirs:
            raise HandshakeError(f"KV layout mismatch: field {f.name!r} differs (local={mine!r}, remote={theirs!r})")


@dataclass(frozen=True)
class PayloadSpec:
    """A named extra tensor that travels with a transfer (e.g. image embeddings)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dtype", dtype_name(self.dtype, "PayloadSpec.dtype"))

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
    # The prompt's blocks before this one are at the receiver already (its prefix cache): the
    # sender sends its block table from here on, into dst_block_ids.
    first_block: int = 0

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
                f"field 'protocol_version' differs (local={PROTOCOL_VERSION}, remote={self.protocol_version})"
            )
        local = compat_hash(layout)
        if self.layout_hash != local:
            raise HandshakeError(f"field 'layout_hash' differs (local={local[:12]}, remote={self.layout_hash[:12]})")


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
