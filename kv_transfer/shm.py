"""Same-node CPU transport over POSIX shared memory, one copy per byte.

The receiver's whole KV cache lives in a shared-memory segment it creates (allocate_cache).
The sender maps that segment once and copies each layer's blocks straight from its own cache
into the reserved destination blocks; the receiver copies nothing. Completion is signalled
per item through a ControlBlock slot (see control.py for the ordering argument).

Resources: the receiver creates everything (cache, control table, one payload segment per request
with payloads) as anonymous shared memory (kv_transfer/segment.py), which the kernel frees once no
process holds it: a killed sender or receiver leaves nothing behind. The sender maps a receiver's
cache and control table once and keeps them while the receiver lives; a watcher thread lets go of
those of a receiver that ended within WATCH_S (its memory is freed then), so no sender keeps a
dead decode worker's cache alive.

The sender copies on one background thread so send_layer returns at once and the copy of layer
l overlaps the compute of layer l+1; finish() waits for the copies.

Tensor parallelism on either side. A tensor-parallel decode worker's cache is spread over its
ranks, each holding a range of the KV heads (KVLayout.kv_heads): every follower rank makes its
cache with `rank_cache` (a segment of its own) and rank 0's receiver learns their handles
(`add_ranks`), so a descriptor names every rank's cache. A tensor-parallel prefill worker is
`senders` senders, one per rank: the receiver opens one control slot per sender for each request,
and each sender copies the heads it holds into the caches of the decode ranks that hold them (the
overlap of the two ranges; one copy per pair of ranks, straight between the caches), then raises
its own slot's flag. An item has landed when every sender's flag is up. So prefill TP a -> decode
TP b works for any a, b dividing the KV heads, with each byte copied once.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.base import (
    KVReceiver,
    KVSender,
    RankCache,
    shared_heads,
    TransferBackend,
    TransferError,
    TransferState,
    TransferStatus,
    TransferTimeout,
)
from kv_transfer.blocks import check_layer_blocks, copy_blocks
from kv_transfer.control import ControlBlock, StateCode
from kv_transfer.layout import PayloadSpec, TransferDescriptor, TransferMetadata
from kv_transfer.segment import Segment, creator_pid, pid_alive

_ALIGN = 64
WATCH_S = 1.0  # how often a sender looks for receivers that ended (their mappings are dropped)


@dataclass(frozen=True)
class ShmEndpoint:
    receiver_id: str  # unique per receiver: key of the sender's cached mappings
    # Per receiving rank: (its first KV head, its number of KV heads, its cache handle); the handle
    # is (segment name, num_blocks) for shm, an IPC handle for cuda_ipc. One entry without TP.
    caches: tuple[tuple[int, int, object], ...]
    ctl_name: str
    num_slots: int
    max_items: int
    slots: tuple[tuple[int, int], ...]  # (slot, generation) per sender, in head order
    payloads: tuple[object, ...] = ()  # one handle per PayloadSpec of the metadata


@dataclass
class _RecvRequest:
    meta: TransferMetadata
    slots: list[tuple[int, int]]  # (slot, generation) per sender
    payloads: dict[str, torch.Tensor]
    segment: Segment | None = None


def _shm_rank_cache(layout, num_blocks: int, device) -> RankCache:
    seg = Segment.create("kv", layout.bytes_per_block() * num_blocks)
    return RankCache(seg.tensor(layout.torch_dtype, layout.cache_shape(num_blocks)), (seg.name, num_blocks), seg.unlink)


class ShmReceiver(KVReceiver):
    backend_name = "shm"

    def __init__(self, layout, *, max_requests: int = 256, max_payloads: int = 8, senders: int = 1) -> None:
        super().__init__(layout, senders=senders)
        self.receiver_id = uuid.uuid4().hex
        num_slots = max_requests * senders
        self._ctl = ControlBlock.create(num_slots, layout.num_layers + max_payloads)
        self._cache_segment: Segment | None = None
        self._free_slots = list(range(num_slots - 1, -1, -1))
        self._gens = itertools.count(1)
        self._requests: dict[str, _RecvRequest] = {}

    rank_cache = staticmethod(_shm_rank_cache)

    # -- hooks the CUDA IPC receiver overrides -------------------------------------------
    def allocate_cache(self, num_blocks: int) -> torch.Tensor:
        shape = self.layout.cache_shape(num_blocks)
        seg = Segment.create("kv", self.layout.bytes_per_block() * num_blocks)
        self._cache_segment = seg
        kv = seg.tensor(self.layout.torch_dtype, shape)
        self.register_cache(kv)
        return kv

    def register_cache(self, kv: torch.Tensor) -> None:
        seg = self._cache_segment
        base = kv.untyped_storage().data_ptr()
        if seg is None or base != torch.frombuffer(seg.buf, dtype=torch.uint8, count=1).data_ptr():
            raise ValueError("the shm receiver writes only into a cache made by allocate_cache()")
        super().register_cache(kv)

    def _cache_handle(self) -> object:
        return (self._cache_segment.name, self.kv.shape[2]) if self._cache_segment else None

    def _alloc_payloads(
        self, request_id: str, specs: Sequence[PayloadSpec]
    ) -> tuple[tuple[object, ...], dict[str, torch.Tensor], Segment | None]:
        offsets, total = [], 0
        for spec in specs:
            offsets.append(total)
            total += -(-spec.nbytes // _ALIGN) * _ALIGN
        seg = Segment.create("pl", total)
        tensors = {s.name: seg.tensor(s.torch_dtype, s.shape, o) for s, o in zip(specs, offsets)}
        return tuple((seg.name, o) for o in offsets), tensors, seg

    # -- KVReceiver ----------------------------------------------------------------------
    def prepare(self, request_id, dst_block_ids, *, num_tokens=None, layers=None, payloads=()):
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already open")
        meta = self._make_metadata(request_id, dst_block_ids, num_tokens, layers, payloads)
        if len(meta.payloads) > self._ctl.max_items - self.layout.num_layers:
            raise ValueError(f"at most {self._ctl.max_items - self.layout.num_layers} payloads")
        senders = self.senders if len(meta.layers) else 1  # payloads come from one sender
        if len(self._free_slots) < senders:
            raise RuntimeError(f"all {self._ctl.num_slots} transfer slots are in use")
        handles, tensors, seg = self._alloc_payloads(request_id, meta.payloads) if meta.payloads else ((), {}, None)
        slots = [(self._free_slots.pop(), next(self._gens)) for _ in range(senders)]
        for slot, gen in slots:
            self._ctl.open_slot(slot, gen, meta.num_items)
        self._requests[request_id] = _RecvRequest(meta, slots, tensors, seg)
        mine = (self.layout.kv_head_start, self.layout.num_kv_heads, self._cache_handle())
        endpoint = ShmEndpoint(
            self.receiver_id,
            (mine, *self._ranks),
            self._ctl.segment.name,
            self._ctl.num_slots,
            self._ctl.max_items,
            tuple(slots),
            handles,
        )
        return TransferDescriptor(self.backend_name, meta, self.whole, endpoint)

    def poll(self, request_id):
        r = self._requests[request_id]
        parts = [self._ctl.snapshot(slot, gen) for slot, gen in r.slots]
        done = parts[0][2].copy()
        for _, _, d in parts[1:]:
            done &= d  # an item has landed when every sender's part has
        n_layers = len(r.meta.layers)
        layers = frozenset(r.meta.layer_start + i for i in range(n_layers) if done[i])
        names = frozenset(p.name for i, p in enumerate(r.meta.payloads) if done[n_layers + i])
        codes = [code for code, _, _ in parts]
        dead = [pid for _, pid, _ in parts if pid and not pid_alive(pid)]
        error = None
        if StateCode.CANCELLED in codes:
            status, error = TransferStatus.CANCELLED, "aborted by sender"
        elif StateCode.FAILED in codes:
            status, error = TransferStatus.FAILED, "sender failed"
        elif done.all():
            status = TransferStatus.DONE  # every byte is here even if finish() never ran
        elif dead:
            status, error = TransferStatus.FAILED, f"sender process {dead[0]} died"
        else:
            # PENDING until a sender connects; then bytes may land at any time
            pending = all(c is StateCode.PENDING for c in codes)
            status = TransferStatus.PENDING if pending else TransferStatus.IN_PROGRESS
        return TransferState(status, layers, names, error)

    def _payload(self, request_id, name):
        return self._requests[request_id].payloads[name]

    def release(self, request_id):
        r = self._requests.pop(request_id, None)
        if r is None:
            return
        for slot, _ in r.slots:
            self._ctl.close_slot(slot, next(self._gens))
            self._free_slots.append(slot)
        if r.segment is not None:
            r.segment.unlink()

    def close(self):
        for rid in list(self._requests):
            self.release(rid)
        self._ctl.segment.unlink()
        if self._cache_segment is not None:
            self._cache_segment.unlink()

    def segment_names(self) -> list[str]:
        """Segments this receiver still has linked (for leak checks)."""
        segs = [self._ctl.segment, self._cache_segment] + [r.segment for r in self._requests.values()]
        return [s.name for s in segs if s is not None and s.owner]


@dataclass
class _SendRequest:
    meta: TransferMetadata
    ep: ShmEndpoint
    ctl: ControlBlock
    slot: int
    gen: int
    # Per receiving rank this sender shares heads with: (its cache, the shared heads as a slice
    # of that cache's heads, the same heads as a slice of this sender's)
    targets: list[tuple[torch.Tensor, slice, slice]]
    payloads: dict[str, torch.Tensor]
    sent: set[int] = field(default_factory=set)
    futures: list[cf.Future] = field(default_factory=list)
    aborted: bool = False


class ShmSender(KVSender):
    backend_name = "shm"

    def __init__(self, layout, *, async_copy: bool = True) -> None:
        super().__init__(layout)
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="kv-shm-send") if async_copy else None
        self._caches: dict[tuple[str, int], torch.Tensor] = {}  # (receiver_id, rank) -> mapped cache
        self._ctls: dict[str, ControlBlock] = {}  # receiver_id -> mapped control table
        self._open: dict[str, _SendRequest] = {}
        self._lock = threading.Lock()  # the mappings: connect and the watcher
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- hooks the CUDA IPC sender overrides ---------------------------------------------
    def _open_cache(self, layout, handle: object, rank: int, cached: torch.Tensor | None) -> torch.Tensor:
        """Receiving rank `rank`'s cache (of `layout`) as a tensor of this process; `cached` is
        the last one opened for that rank of that receiver."""
        if cached is not None:
            return cached
        name, num_blocks = handle
        return Segment.attach(name).tensor(layout.torch_dtype, layout.cache_shape(num_blocks))

    def _targets(self, ep: ShmEndpoint, whole) -> list[tuple[torch.Tensor, slice, slice]]:
        """The receiving ranks whose heads overlap this sender's, with their caches opened."""
        mine = self.layout.kv_heads
        out = []
        for rank, (start, n, handle) in enumerate(ep.caches):
            lo, hi = shared_heads((start, n), (mine.start, len(mine)))
            if lo >= hi:
                continue
            key = (ep.receiver_id, rank)
            cache = self._caches[key] = self._open_cache(
                whole.with_heads(range(start, start + n)), handle, rank, self._caches.get(key)
            )
            out.append((cache, slice(lo - start, hi - start), slice(lo - mine.start, hi - mine.start)))
        return out

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_S):
            self.forget_ended()

    def forget_ended(self) -> list[str]:
        """Let go of the mappings of receivers whose process ended (a request still open to one
        keeps its own until it is aborted or finished): the memory of a dead decode worker's
        cache is freed once no process maps it. Returns their receiver ids."""
        with self._lock:
            busy = {r.ep.receiver_id for r in list(self._open.values())}
            ended = [
                rid
                for rid, ctl in self._ctls.items()
                if rid not in busy and (pid := creator_pid(ctl.segment.name)) is not None and not pid_alive(pid)
            ]
            for rid in ended:
                del self._ctls[rid]
                for key in [k for k in self._caches if k[0] == rid]:
                    del self._caches[key]
        return ended

    def _open_payloads(self, meta: TransferMetadata, ep: ShmEndpoint) -> dict[str, torch.Tensor]:
        if not meta.payloads:
            return {}
        seg = Segment.attach(ep.payloads[0][0])
        return {s.name: seg.tensor(s.torch_dtype, s.shape, off) for s, (_, off) in zip(meta.payloads, ep.payloads)}

    def _start_copy(self, dst: torch.Tensor, dst_ids, src: torch.Tensor, src_ids) -> Callable[[], None]:
        """Begin moving src into dst; the returned callable completes it (on the copy thread)."""
        return lambda: copy_blocks(dst, dst_ids, src, src_ids)

    # -- KVSender ------------------------------------------------------------------------
    def connect(self, desc):
        meta, ep = desc.meta, desc.endpoint
        part = self._check_descriptor(desc, len(ep.slots))
        if meta.request_id in self._open:
            raise ValueError(f"request {meta.request_id!r} is already connected")
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="kv-shm-watch", daemon=True)
            self._watcher.start()
        with self._lock:
            ctl = self._ctls.get(ep.receiver_id)
            if ctl is None:
                ctl = self._ctls[ep.receiver_id] = ControlBlock.attach(ep.ctl_name, ep.num_slots, ep.max_items)
            slot, gen = ep.slots[part]
            if not ctl.owns(slot, gen):
                raise TransferError(f"request {meta.request_id!r} was released by the receiver")
            targets = self._targets(ep, desc.layout) if len(meta.layers) else []
        ctl.set_pid(slot, os.getpid())
        ctl.set_state(slot, gen, StateCode.IN_PROGRESS)
        self._open[meta.request_id] = _SendRequest(meta, ep, ctl, slot, gen, targets, self._open_payloads(meta, ep))

    def _submit(self, r: _SendRequest, item: int, start: Callable[[], Callable[[], None]]) -> None:
        if item in r.sent:
            raise ValueError(f"item {item} of request {r.meta.request_id!r} sent twice")
        if not r.ctl.owns(r.slot, r.gen):
            raise TransferError(f"request {r.meta.request_id!r} was released by the receiver")
        r.sent.add(item)
        complete = start()

        def land() -> None:
            if r.aborted:
                return
            if not r.ctl.owns(r.slot, r.gen):
                raise TransferError(f"request {r.meta.request_id!r} was released by the receiver")
            complete()
            r.ctl.mark_item(r.slot, r.gen, item)

        if self._pool is None:
            land()
        else:
            r.futures.append(self._pool.submit(land))

    def send_layer(self, request_id, layer, blocks, src_block_ids=None):
        r = self._open[request_id]
        check_layer_blocks(self.layout, r.meta, layer, blocks, src_block_ids)

        def start() -> Callable[[], None]:
            copies = [
                self._start_copy(
                    cache[layer][..., theirs, :], r.meta.dst_block_ids, blocks[..., mine, :], src_block_ids
                )
                for cache, theirs, mine in r.targets
            ]

            def complete_all() -> None:
                for complete in copies:
                    complete()

            return complete_all

        self._submit(r, layer - r.meta.layer_start, start)

    def send_payload(self, request_id, name, tensor):
        r = self._open[request_id]
        dst = r.payloads.get(name)
        item = r.meta.payload_index(name)
        if dst is None or dst.shape != tensor.shape or dst.dtype != tensor.dtype:
            raise ValueError(f"payload {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, expected {r.meta.payloads}")
        self._submit(r, item, lambda: self._start_copy_payload(dst, tensor))

    def _start_copy_payload(self, dst: torch.Tensor, src: torch.Tensor) -> Callable[[], None]:
        return lambda: dst.copy_(src)

    def finish(self, request_id, *, timeout):
        r = self._open[request_id]
        done, pending = cf.wait(r.futures, timeout=timeout)
        if pending:
            raise TransferTimeout(f"request {request_id!r}: copies not done after {timeout}s")
        del self._open[request_id]
        errors = [f.exception() for f in done if f.exception() is not None]
        missing = sorted(set(range(r.meta.num_items)) - r.sent)
        if errors or missing:
            r.ctl.set_state(r.slot, r.gen, StateCode.FAILED)
            why = errors[0] if errors else f"items {missing} were never sent"
            raise TransferError(f"request {request_id!r} failed: {why}")
        r.ctl.set_state(r.slot, r.gen, StateCode.DONE)

    def abort(self, request_id):
        r = self._open.pop(request_id, None)
        if r is None:
            return
        r.aborted = True
        for f in r.futures:
            f.cancel()
        cf.wait(r.futures, timeout=10.0)  # a copy already running finishes before blocks are reused
        r.ctl.set_state(r.slot, r.gen, StateCode.CANCELLED)

    def close(self):
        for rid in list(self._open):
            self.abort(rid)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._closed.set()
        if self._watcher is not None:
            self._watcher.join(5)
        with self._lock:
            self._caches.clear()
            self._ctls.clear()


class ShmBackend(TransferBackend):
    name = "shm"
    Sender = ShmSender
    Receiver = ShmReceiver
