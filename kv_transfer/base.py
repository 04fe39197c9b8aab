"""Sender/receiver interfaces shared by every KV transport.

One request's transfer, as seen by the receiver (decode worker, or prefill worker receiving
embeddings) and the sender (prefill worker, or encode worker):

    receiver                                  sender
    --------                                  ------
    allocate_cache / register_cache           (once per worker)
    handshake(peer_layout)                    (once per peer, raises HandshakeError)
    desc = prepare(rid, dst_blocks, ...)  --> connect(desc)           PENDING -> IN_PROGRESS
    wait(rid, layers=[l], timeout)       <--  send_layer(rid, l, blocks)  (per layer, streamed)
    recv_payload(rid, name, timeout)     <--  send_payload(rid, name, tensor)
    wait(rid, timeout)  -> DONE          <--  finish(rid, timeout)    IN_PROGRESS -> DONE
                                         <--  abort(rid)              -> CANCELLED
    release(rid)                              (receiver frees its bookkeeping; blocks reusable)

State machine (TransferStatus), as reported by the receiver's poll():

    PENDING --connect--> IN_PROGRESS --all items landed--> DONE
       |                    |--abort--> CANCELLED
       |                    '--sender died / link error--> FAILED
       '--------abort-----------------> CANCELLED

DONE, CANCELLED and FAILED are terminal. Every blocking call takes a timeout (seconds) and
raises TransferTimeout when it expires.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from engine.kv_layout import KVLayout
from kv_transfer.registry import transport_info
from kv_transfer.layout import (
    HandshakeError,
    PayloadSpec,
    TransferDescriptor,
    TransferMetadata,
    check_compatible,
    compat_hash,
)


class TransferStatus(enum.Enum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TransferStatus.DONE, TransferStatus.FAILED, TransferStatus.CANCELLED)


class TransferError(RuntimeError):
    """A transfer ended without delivering what was asked for."""


class TransferCancelled(TransferError):
    pass


class TransferFailed(TransferError):
    pass


class TransferTimeout(TransferError, TimeoutError):
    pass


@dataclass(frozen=True)
class TransferState:
    """Snapshot of one request on the receiver. `layers_done` holds absolute layer indices."""

    status: TransferStatus
    layers_done: frozenset[int]
    payloads_done: frozenset[str]
    error: str | None = None


@dataclass
class RankCache:
    """A follower rank's receive cache: the tensor, the handle senders open it by, and what
    frees it (called by the rank when it ends)."""

    kv: torch.Tensor
    handle: object
    close: Callable[[], None]


class KVReceiver(ABC):
    """Receiving end; owns the destination cache and every resource it creates.

    Invariants:
    - The cache is registered (allocate_cache or register_cache) before prepare() with layers.
    - Until release(rid), the blocks in `dst_block_ids` belong to the transfer: the sender
      writes them at any time while IN_PROGRESS. After release() a sender may still land at most
      the item it is copying at that moment; the caller frees the blocks only after a terminal
      state, or after the sender is known dead.
    - The layers reported done in poll()/wait() hold their final K/V in `kv[layer][:, dst_ids]`.
    - close() releases every request and removes every OS resource (segments, sockets).
    """

    backend_name: ClassVar[str]

    def __init__(self, layout: KVLayout, *, senders: int = 1) -> None:
        """layout: this process's cache. senders: how many senders fill each transfer (the
        ranks of a tensor-parallel prefill worker, each sending its own KV heads)."""
        if not isinstance(senders, int) or senders < 1:
            raise ValueError(f"senders must be a positive int, got {senders!r}")
        if senders > 1 and not transport_info(self.backend_name).tensor_parallel:
            raise ValueError(self._one_rank_only())
        self.layout = layout
        self.whole = layout  # what senders see: this cache's layout, or its group's (add_ranks)
        self.senders = senders
        self.kv: torch.Tensor | None = None
        # The follower ranks (add_ranks), in head order: (first KV head, number of heads, the
        # handle senders reach that rank's cache by); descriptors name them after this cache.
        self._ranks: tuple[tuple[int, int, object], ...] = ()

    @classmethod
    def _one_rank_only(cls) -> str:
        return (
            f"the {cls.backend_name} KV transport connects one sender to one cache: workers of tensor_parallel > 1 "
            f"in the prefill or decode pool need one that writes each rank's heads in place (kv_transfer/registry.py)"
        )

    @classmethod
    def rank_cache(cls, layout: KVLayout, num_blocks: int, device: torch.device) -> RankCache:
        """The cache of a follower rank of a tensor-parallel receiver (its KV heads), made where
        senders can write it; its handle goes to rank 0's receiver (add_ranks)."""
        raise ValueError(cls._one_rank_only())

    def add_ranks(self, ranks: Sequence[tuple[KVLayout, object]]) -> None:
        """Rank 0 of a tensor-parallel receiver: the other ranks' layouts and cache handles
        (rank_cache); senders then write each rank's heads into that rank's cache. The ranks'
        heads must make one range from 0, each rank the same cache but for its heads."""
        if not transport_info(self.backend_name).tensor_parallel:
            raise ValueError(self._one_rank_only())
        heads = [self.layout.kv_heads] + [lay.kv_heads for lay, _ in ranks]
        for lay, _ in ranks:
            check_compatible(self.layout.with_heads(lay.kv_heads), lay)  # the same cache but its heads
        if self.layout.kv_head_start != 0 or any(a.stop != b.start for a, b in zip(heads, heads[1:])):
            raise ValueError(f"the ranks' KV heads {[(h.start, h.stop) for h in heads]} are not one range from 0")
        self._ranks = tuple((lay.kv_head_start, lay.num_kv_heads, handle) for lay, handle in ranks)
        self.whole = self.layout.with_heads(range(0, heads[-1].stop))

    def allocate_cache(self, num_blocks: int) -> torch.Tensor:
        """Allocate the worker's KV cache where this transport can write it, and register it."""
        kv = self.layout.new_cache(num_blocks)
        self.register_cache(kv)
        return kv

    def register_cache(self, kv: torch.Tensor) -> None:
        self.layout.check_cache(kv)
        self.kv = kv

    def handshake(self, peer_layout: KVLayout) -> None:
        """Raise HandshakeError naming the first field where the peer's layout differs."""
        check_compatible(self.whole, peer_layout)

    def _make_metadata(
        self,
        request_id: str,
        dst_block_ids: Sequence[int],
        num_tokens: int | None,
        layers: range | None,
        payloads: Sequence[PayloadSpec],
    ) -> TransferMetadata:
        dst = tuple(int(b) for b in dst_block_ids)
        layers = range(self.layout.num_layers) if layers is None else layers
        if num_tokens is None:
            num_tokens = len(dst) * self.layout.block_size
        if num_tokens > len(dst) * self.layout.block_size:
            raise ValueError(f"{num_tokens} tokens do not fit in {len(dst)} blocks")
        if len(layers) and (layers.step != 1 or layers.start < 0 or layers.stop > self.layout.num_layers):
            raise ValueError(f"bad layer range {layers} for {self.layout.num_layers} layers")
        if len(layers) and dst:
            if self.kv is None:
                raise RuntimeError("register_cache() before prepare() of a KV transfer")
            if min(dst) < 0 or max(dst) >= self.kv.shape[2] or len(set(dst)) != len(dst):
                raise ValueError(f"dst_block_ids must be distinct blocks < {self.kv.shape[2]}")
        names = [p.name for p in payloads]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate payload names {names}")
        return TransferMetadata(
            request_id=request_id,
            layout_hash=compat_hash(self.whole),
            dst_block_ids=dst,
            num_tokens=num_tokens,
            layer_start=layers.start if len(layers) else 0,
            layer_end=layers.stop if len(layers) else 0,
            payloads=tuple(payloads),
        )

    @abstractmethod
    def prepare(
        self,
        request_id: str,
        dst_block_ids: Sequence[int],
        *,
        num_tokens: int | None = None,
        layers: range | None = None,
        payloads: Sequence[PayloadSpec] = (),
    ) -> TransferDescriptor:
        """Open a transfer into `dst_block_ids` (for `layers`, default all) plus `payloads`.

        Returns the picklable descriptor the sender passes to connect(). request_id must not
        be open already.
        """

    @abstractmethod
    def poll(self, request_id: str) -> TransferState:
        """Non-blocking snapshot of the request. KeyError if it is not open."""

    @abstractmethod
    def _payload(self, request_id: str, name: str) -> torch.Tensor:
        """The landed payload tensor (only called once the payload is reported done)."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Forget the request (idempotent); free per-request resources, fence its sender."""

    @abstractmethod
    def close(self) -> None:
        """Release every request and remove every OS resource. Idempotent."""

    def wait(
        self,
        request_id: str,
        *,
        layers: Iterable[int] | None = None,
        payloads: Iterable[str] = (),
        timeout: float,
    ) -> TransferState:
        """Block until `layers` and `payloads` have landed (layers=None: the whole transfer).

        Raises TransferCancelled / TransferFailed when the transfer ends before that, and
        TransferTimeout after `timeout` seconds.
        """
        want_layers = None if layers is None else frozenset(layers)
        want_payloads = frozenset(payloads)
        deadline = time.monotonic() + timeout
        pause = 2e-5
        while True:
            state = self.poll(request_id)
            if state.status is TransferStatus.CANCELLED:
                raise TransferCancelled(f"request {request_id!r} cancelled: {state.error or 'by sender'}")
            if state.status is TransferStatus.FAILED:
                raise TransferFailed(f"request {request_id!r} failed: {state.error}")
            if want_layers is None:
                if state.status is TransferStatus.DONE:
                    return state
            elif want_layers <= state.layers_done and want_payloads <= state.payloads_done:
                return state
            now = time.monotonic()
            if now >= deadline:
                raise TransferTimeout(
                    f"request {request_id!r}: timed out after {timeout}s in {state.status.name} "
                    f"with layers {sorted(state.layers_done)} done"
                )
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 1e-3)

    def recv_payload(self, request_id: str, name: str, *, timeout: float) -> torch.Tensor:
        """Wait for payload `name` and return it; valid until release(request_id)."""
        self.wait(request_id, layers=(), payloads=(name,), timeout=timeout)
        return self._payload(request_id, name)

    def __enter__(self) -> KVReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shared_heads(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The KV heads two (first head, number of heads) ranges share, as (lo, hi); none when lo >= hi."""
    return max(a[0], b[0]), min(a[0] + a[1], b[0] + b[1])


class KVSender(ABC):
    """Sending end; owns nothing of the receiver's and creates no OS resource it cannot drop.

    Invariants:
    - connect(desc) checks protocol version and layout (HandshakeError) before anything moves.
    - send_layer/send_payload may return before the data has landed; the source tensor must
      stay unchanged until finish() returns or abort() is called.
    - Each item (layer of desc.meta.layers, payload of desc.meta.payloads) is sent once.
    - finish() returns only when every item has landed, so the receiver reports DONE; it
      raises TransferError (and leaves the request FAILED) if an item was never sent.
    - abort() never raises; the receiver reports CANCELLED.
    """

    backend_name: ClassVar[str]

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout

    def _check_descriptor(self, desc: TransferDescriptor, parts: int = 1) -> int:
        """Check `desc` against this sender; returns which of the transfer's `parts` senders
        this one is. A tensor-parallel sender is one of `parts` equal parts of its group's KV
        heads (its layout's `kv_heads`); the receiver's descriptor describes the whole group's
        layout, which the parts together must make up. One sender (parts 1) holds every head."""
        if desc.backend != self.backend_name:
            raise ValueError(f"descriptor is for backend {desc.backend!r}, not {self.backend_name!r}")
        n, start = self.layout.num_kv_heads, self.layout.kv_head_start
        if start % n or start // n >= parts:
            raise HandshakeError(
                f"this sender holds KV heads {start}..{start + n - 1}, not one of the {parts} equal parts "
                f"of the heads the receiver expects senders for"
            )
        whole = self.layout.with_heads(range(0, n * parts))
        check_compatible(whole, desc.layout)
        desc.meta.check_against(whole)
        return start // n

    @abstractmethod
    def connect(self, desc: TransferDescriptor) -> None:
        """Open the request described by `desc` (from the receiver's prepare())."""

    @abstractmethod
    def send_layer(
        self,
        request_id: str,
        layer: int,
        blocks: torch.Tensor,
        src_block_ids: Sequence[int] | None = None,
    ) -> None:
        """Send K/V of `layer` into the receiver's dst blocks.

        blocks: [2, n, block_size, Hkv, D] in dst order when src_block_ids is None; otherwise
        the sender's whole layer [2, num_src_blocks, ...] and src_block_ids (length n) picks the
        blocks, gathered without an intermediate copy where the transport allows.
        """

    @abstractmethod
    def send_payload(self, request_id: str, name: str, tensor: torch.Tensor) -> None:
        """Send payload `name` (shape and dtype as declared by the receiver)."""

    @abstractmethod
    def finish(self, request_id: str, *, timeout: float) -> None:
        """Flush every item of the request; on return the receiver reports DONE."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop the request; the receiver reports CANCELLED. Never raises."""

    @abstractmethod
    def close(self) -> None:
        """Abort open requests and drop every mapping / connection. Idempotent."""

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TransferBackend:
    """A named pair of Sender/Receiver classes; what the registry returns. Where a transport
    works (same node only, CUDA only) is said once, in kv_transfer/registry.py."""

    name: ClassVar[str]
    Sender: ClassVar[type[KVSender]]
    Receiver: ClassVar[type[KVReceiver]]
