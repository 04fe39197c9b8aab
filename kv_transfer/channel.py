"""Point-to-point transports signalled through a TCPStore (shared by gloo and NCCL).

The receiver runs a TCPStore server on a port the OS picks (port 0) and puts (host, port) in
every descriptor. A sender talking to a receiver for the first time becomes its pair `i`:

    sender                                   receiver
    store.add("npairs") -> i; set hello/i    accept thread: wait hello/i, start pair thread i
    Link(rank 1) ......rendezvous........... Link(rank 0)  (own process group, never the default)

Every message on pair i has a number n: the sender sets the header `pair/i/msg/n` in the store
and, for an item, sends the body on the link with tag n. The pair thread reads headers in order,
receives each body into a staging buffer and scatters it into the reserved blocks, so a posted
receive always has a sender already sending, and bodies of released requests are drained.

Tensor-parallel groups (prefill TP a -> decode TP b): every receiving rank runs a receiver; rank
0's is the one that prepares transfers, and its descriptor names every rank's receiver with the
KV heads it holds. Each of the a senders sends each layer's heads it shares with a receiving rank
to that rank (one message per overlapping pair, only those heads), and its control messages
(connect, finish, abort) to rank 0. A follower rank learns a transfer from its sender's connect
(rank 0's number for it, the destination blocks), lands the heads in its own cache and reports
each landed item to rank 0 over a control pair (no link); rank 0 counts an item done when every
(sender, rank) part of it has landed. Rank 0 keeps a key `open/<seq>` while a transfer is open,
and a follower lands nothing for a transfer whose key is gone (released: its blocks may be reused).

Closing interrupts blocked store waits by setting the awaited keys to a sentinel.
"""

from __future__ import annotations

import enum
import itertools
import logging
import pickle
import socket
import threading
import uuid
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.base import (
    KVReceiver,
    KVSender,
    RankCache,
    shared_heads,
    TransferError,
    TransferState,
    TransferStatus,
    TransferTimeout,
)
from kv_transfer.blocks import check_layer_blocks, copy_blocks, gather_blocks
from kv_transfer.layout import TransferDescriptor, TransferMetadata

log = logging.getLogger(__name__)
_CLOSE = b"__close__"
_CONTROL = b"control"  # hello of a follower rank's control pair to rank 0 (no link, no bodies)
_FOREVER = timedelta(days=7)


class Msg(enum.IntEnum):
    CONNECT = 1
    ITEM = 2
    FINISH = 3
    ABORT = 4
    BYE = 5
    LANDED = 6  # follower -> rank 0: an item's heads landed in the follower's cache
    FAILED = 7  # follower -> rank 0: its link to a sender broke while carrying the request


def default_host() -> str:
    """This node's address as the other nodes see it (hostname lookup, else loopback)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


Address = tuple[str, str, int]  # (receiver_id, host, port)


@dataclass(frozen=True)
class ChannelEndpoint:
    receiver_id: str
    host: str
    port: int
    seq: int  # receiver's number for the request, carried in every header
    senders: int = 1  # how many senders fill the transfer (a tensor-parallel prefill worker's ranks)
    # The receiving ranks in head order: (first KV head, number of heads, address); rank 0 is the
    # receiver above and, without tensor parallelism, the only one.
    caches: tuple[tuple[int, int, Address], ...] = ()


@dataclass(frozen=True)
class _Header:
    kind: int
    seq: int
    item: int = -1
    nbytes: int = 0
    extra: object = None  # ITEM: (lo, hi) heads of the receiving cache; follower CONNECT: _Part; FINISH: missing


class Link:
    """A two-rank bulk pipe. send() is asynchronous; recv() blocks until the bytes landed."""

    @abstractmethod
    def send(self, tensor: torch.Tensor, tag: int) -> object:
        """Start sending; returns a handle with wait(timeout_s)."""

    @abstractmethod
    def recv(self, tensor: torch.Tensor, tag: int) -> None: ...

    def close(self) -> None:
        pass


@dataclass
class _RecvRequest:
    meta: TransferMetadata
    seq: int
    payloads: dict[str, torch.Tensor]
    expected: int  # parts per layer: (sender, receiving rank) pairs sharing heads
    landed: list[int]  # parts landed per item
    status: TransferStatus = TransferStatus.PENDING
    layers_done: set[int] = field(default_factory=set)
    payloads_done: set[str] = field(default_factory=set)
    error: str | None = None
    pairs: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Part:
    """A follower rank's share of a transfer rank 0 prepared, as its sender's connect says."""

    rank0: Address
    seq: int  # rank 0's number for the request
    dst_block_ids: tuple[int, ...]
    layer_start: int


class _Reporter:
    """A follower rank's control pair to rank 0's receiver: what landed, what failed."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout))
        self.index = self.store.add("npairs", 1) - 1
        self.store.set(f"hello/{self.index}", _CONTROL)
        self._n = 0
        self._lock = threading.Lock()

    def is_open(self, seq: int) -> bool:
        with self._lock:
            return self.store.check([f"open/{seq}"])

    def post(self, header: _Header) -> None:
        with self._lock:
            self.store.set(f"pair/{self.index}/msg/{self._n}", pickle.dumps(header))
            self._n += 1


class ChannelReceiver(KVReceiver):
    """Receiver half; subclasses give the link and where staging buffers live."""

    def __init__(self, layout, *, host: str | None = None, timeout: float = 120.0, senders: int = 1) -> None:
        super().__init__(layout, senders=senders)
        self.host = host or default_host()
        self.timeout = timeout
        self.receiver_id = uuid.uuid4().hex
        self._store = dist.TCPStore(
            self.host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout)
        )
        self.port = self._store.port
        self._lock = threading.Lock()
        self._closed = False
        self._waiting: dict[int, str] = {}  # thread id -> key it is blocked on
        self._requests: dict[str, _RecvRequest] = {}
        self._by_seq: dict[int, _RecvRequest] = {}
        self._seqs = itertools.count(1)
        self._reporters: dict[str, _Reporter] = {}  # a follower's control pairs, by rank 0's receiver id
        self._threads = [threading.Thread(target=self._accept, name="kv-accept", daemon=True)]
        self._threads[0].start()

    @abstractmethod
    def _make_link(self, store: dist.Store, prefix: str) -> Link: ...

    @property
    def _staging_device(self) -> torch.device:
        return torch.device("cpu")

    def _sync_landed(self) -> None:
        """Make the scatter of the last item complete before it is reported done."""

    @classmethod
    def _for_rank(cls, layout, device: torch.device) -> ChannelReceiver:
        """The receiver a follower rank runs for its cache."""
        return cls(layout)

    @property
    def address(self) -> Address:
        return (self.receiver_id, self.host, self.port)

    # -- tensor-parallel groups ------------------------------------------------------------
    @classmethod
    def rank_cache(cls, layout, num_blocks: int, device) -> RankCache:
        rx = cls._for_rank(layout, device)
        try:
            kv = rx.allocate_cache(num_blocks)
        except BaseException:
            rx.close()
            raise
        return RankCache(kv, rx.address, rx.close)

    def _parts_per_layer(self) -> int:
        step = self.whole.num_kv_heads // self.senders
        ranks = [(self.layout.kv_head_start, self.layout.num_kv_heads)] + [(s, n) for s, n, _ in self._ranks]
        shared = (shared_heads((p * step, step), r) for p in range(self.senders) for r in ranks)
        return sum(1 for lo, hi in shared if lo < hi)

    # -- threads ---------------------------------------------------------------------------
    def _client(self) -> dist.TCPStore:
        return dist.TCPStore(self.host, self.port, is_master=False, timeout=timedelta(seconds=self.timeout))

    def _wait_key(self, store: dist.Store, key: str) -> bytes | None:
        """Block until `key` is set and return its value; None once the receiver closes."""
        me = threading.get_ident()
        with self._lock:
            if self._closed:
                return None
            self._waiting[me] = key
        try:
            store.wait([key], _FOREVER)
            value = store.get(key)
        finally:
            with self._lock:
                self._waiting.pop(me, None)
        if value == _CLOSE:
            return None
        store.delete_key(key)
        return value

    def _accept(self) -> None:
        store = self._client()
        for i in itertools.count():
            hello = self._wait_key(store, f"hello/{i}")
            if hello is None:
                return
            t = threading.Thread(target=self._serve_pair, args=(i, hello), name=f"kv-pair-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve_pair(self, i: int, hello: bytes) -> None:
        store = self._client()
        link = None
        if hello != _CONTROL:
            try:
                link = self._make_link(store, f"pair/{i}/link")
            except Exception:
                log.exception("KV pair %d: link setup failed", i)
                return
        staging = torch.empty(0, dtype=torch.uint8, device=self._staging_device)
        parts: dict[int, _Part] = {}  # follower side: this pair's shares of transfers rank 0 prepared
        try:
            for n in itertools.count():
                raw = self._wait_key(store, f"pair/{i}/msg/{n}")
                if raw is None:
                    return
                h: _Header = pickle.loads(raw)
                if h.kind == Msg.BYE:
                    return
                if h.kind == Msg.ITEM:
                    if staging.numel() < h.nbytes:
                        staging = torch.empty(h.nbytes, dtype=torch.uint8, device=self._staging_device)
                    link.recv(staging[: h.nbytes], n)
                    if h.seq in parts:
                        self._land_part(parts[h.seq], h, staging[: h.nbytes])
                    else:
                        self._land(h, staging[: h.nbytes])
                elif isinstance(h.extra, _Part):  # CONNECT of a share of rank 0's transfer
                    parts[h.seq] = h.extra
                elif h.seq in parts and h.kind in (Msg.FINISH, Msg.ABORT):
                    del parts[h.seq]
                else:
                    self._control(i, h)
        except Exception as e:  # link broken (peer died): fail what the pair was carrying
            why = f"link to sender lost: {e}"
            with self._lock:
                for r in self._by_seq.values():
                    if i in r.pairs and not r.status.terminal:
                        r.status, r.error = TransferStatus.FAILED, why
            for p in parts.values():
                try:
                    self._reporter(p.rank0).post(_Header(Msg.FAILED, p.seq, extra=why))
                except Exception:
                    log.warning("KV pair %d: cannot tell rank 0 that request %d failed", i, p.seq)
        finally:
            if link is not None:
                link.close()

    def _control(self, pair: int, h: _Header) -> None:
        with self._lock:
            r = self._by_seq.get(h.seq)
            if r is None or r.status.terminal:
                return
            if h.kind == Msg.CONNECT:
                r.status = TransferStatus.IN_PROGRESS
                r.pairs.add(pair)
            elif h.kind == Msg.ABORT:
                r.status, r.error = TransferStatus.CANCELLED, "aborted by sender"
            elif h.kind == Msg.FINISH and h.extra:
                r.status, r.error = TransferStatus.FAILED, f"sender finished without sending items {h.extra}"
            elif h.kind == Msg.LANDED:
                self._count(r, h.item)
            elif h.kind == Msg.FAILED:
                r.status, r.error = TransferStatus.FAILED, f"a receiving rank's {h.extra}"

    def _count(self, r: _RecvRequest, item: int) -> None:
        """One part of `item` landed (caller holds the lock)."""
        meta, n_layers = r.meta, len(r.meta.layers)
        r.landed[item] += 1
        if item < n_layers:
            if r.landed[item] == r.expected:
                r.layers_done.add(meta.layer_start + item)
        else:
            r.payloads_done.add(meta.payloads[item - n_layers].name)
        if len(r.layers_done) + len(r.payloads_done) == meta.num_items and not r.status.terminal:
            r.status = TransferStatus.DONE

    def _write_layer(self, layer: int, dst: Sequence[int], body: torch.Tensor, heads: tuple[int, int]) -> None:
        lo, hi = heads
        lay = self.layout
        blocks = body.view(lay.torch_dtype).view(2, len(dst), lay.block_size, hi - lo, lay.head_dim)
        copy_blocks(self.kv[layer][..., lo:hi, :], dst, blocks)
        self._sync_landed()

    def _land(self, h: _Header, body: torch.Tensor) -> None:
        with self._lock:
            r = self._by_seq.get(h.seq)
        if r is None or r.status.terminal:
            return  # released or ended: the body was drained, nothing to write
        meta, n_layers = r.meta, len(r.meta.layers)
        if h.item < n_layers:
            self._write_layer(meta.layer_start + h.item, meta.dst_block_ids, body, h.extra)
        else:
            r.payloads[meta.payloads[h.item - n_layers].name].view(-1).view(torch.uint8).copy_(body)
            self._sync_landed()
        with self._lock:
            if not r.status.terminal:
                self._count(r, h.item)

    def _reporter(self, rank0: Address) -> _Reporter:
        with self._lock:
            rep = self._reporters.get(rank0[0])
        if rep is None:
            rep = _Reporter(rank0[1], rank0[2], self.timeout)  # outside the lock: rank 0 may be slow
            with self._lock:
                rep = self._reporters.setdefault(rank0[0], rep)
        return rep

    def _land_part(self, p: _Part, h: _Header, body: torch.Tensor) -> None:
        rep = self._reporter(p.rank0)
        if not rep.is_open(p.seq):
            return  # rank 0 released the request: its blocks may hold another request's KV now
        self._write_layer(p.layer_start + h.item, p.dst_block_ids, body, h.extra)
        rep.post(_Header(Msg.LANDED, p.seq, h.item))

    # -- KVReceiver ----------------------------------------------------------------------
    def prepare(self, request_id, dst_block_ids, *, num_tokens=None, layers=None, payloads=()):
        meta = self._make_metadata(request_id, dst_block_ids, num_tokens, layers, payloads)
        tensors = {
            p.name: torch.empty(p.shape, dtype=p.torch_dtype, device=self._staging_device) for p in meta.payloads
        }
        expected = self._parts_per_layer()
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already open")
            seq = next(self._seqs)
            r = _RecvRequest(meta, seq, tensors, expected, [0] * meta.num_items)
            self._requests[request_id] = self._by_seq[seq] = r
            if meta.num_items == 0:
                r.status = TransferStatus.DONE
        if self._ranks:
            self._store.set(f"open/{seq}", b"")
        mine = (self.layout.kv_head_start, self.layout.num_kv_heads, self.address)
        endpoint = ChannelEndpoint(
            self.receiver_id, self.host, self.port, seq, self.senders if len(meta.layers) else 1, (mine, *self._ranks)
        )
        return TransferDescriptor(self.backend_name, meta, self.whole, endpoint)

    def poll(self, request_id):
        with self._lock:
            r = self._requests[request_id]
            return TransferState(r.status, frozenset(r.layers_done), frozenset(r.payloads_done), r.error)

    def _payload(self, request_id, name):
        return self._requests[request_id].payloads[name]

    def release(self, request_id):
        with self._lock:
            r = self._requests.pop(request_id, None)
            if r is not None:
                del self._by_seq[r.seq]
        if r is not None and self._ranks:
            self._store.delete_key(f"open/{r.seq}")

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiting.values())
            self._requests.clear()
            self._by_seq.clear()
            reporters = list(self._reporters.values())
        for key in waiting:
            self._store.set(key, _CLOSE)  # the waiting thread's own client is busy in wait()
        for rep in reporters:
            try:
                rep.post(_Header(Msg.BYE, 0))
            except Exception:
                pass
        for t in self._threads:
            t.join(timeout=5.0)


@dataclass
class _Pair:
    store: dist.TCPStore
    link: Link
    index: int
    next_msg: int = 0
    broken: bool = False


@dataclass
class _SendRequest:
    meta: TransferMetadata
    control: _Pair  # rank 0's pair: connect, finish, abort
    seq: int
    # Per receiving rank this sender shares heads with: (its pair, the shared heads as (lo, hi)
    # of that rank's cache, the same heads as a slice of this sender's)
    targets: list[tuple[_Pair, tuple[int, int], slice]]
    followers: list[_Pair]  # pairs to follower ranks, told of the end too
    sent: set[int] = field(default_factory=set)
    pending: list[tuple[_Pair, object, torch.Tensor]] = field(default_factory=list)  # (pair, handle, body)


class ChannelSender(KVSender):
    def __init__(self, layout, *, host: str | None = None, timeout: float = 120.0) -> None:
        super().__init__(layout)
        self.host = host or default_host()
        self.timeout = timeout
        self._pairs: dict[str, _Pair] = {}
        self._open: dict[str, _SendRequest] = {}

    @abstractmethod
    def _make_link(self, store: dist.Store, prefix: str) -> Link: ...

    def _pair(self, addr: Address) -> _Pair:
        receiver_id, host, port = addr
        pair = self._pairs.get(receiver_id)
        if pair is None or pair.broken:
            store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=self.timeout))
            i = store.add("npairs", 1) - 1
            store.set(f"hello/{i}", b"")
            pair = self._pairs[receiver_id] = _Pair(store, self._make_link(store, f"pair/{i}/link"), i)
        return pair

    def _post(self, pair: _Pair, h: _Header, body: torch.Tensor | None = None):
        n = pair.next_msg
        pair.next_msg += 1
        pair.store.set(f"pair/{pair.index}/msg/{n}", pickle.dumps(h))
        return None if body is None else pair.link.send(body, n)

    def _as_bytes(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)

    def connect(self, desc):
        ep: ChannelEndpoint = desc.endpoint
        self._check_descriptor(desc, ep.senders)
        meta = desc.meta
        if meta.request_id in self._open:
            raise ValueError(f"request {meta.request_id!r} is already connected")
        caches = ep.caches or ((0, desc.layout.num_kv_heads, (ep.receiver_id, ep.host, ep.port)),)
        mine = (self.layout.kv_head_start, self.layout.num_kv_heads)
        control = self._pair(caches[0][2])
        self._post(control, _Header(Msg.CONNECT, ep.seq))
        targets, followers = [], []
        for rank, (start, n, addr) in enumerate(caches):
            lo, hi = shared_heads((start, n), mine)
            if lo >= hi or not len(meta.layers):
                continue
            pair = control if rank == 0 else self._pair(addr)
            if rank > 0:
                part = _Part(caches[0][2], ep.seq, meta.dst_block_ids, meta.layer_start)
                self._post(pair, _Header(Msg.CONNECT, ep.seq, extra=part))
                followers.append(pair)
            targets.append((pair, (lo - start, hi - start), slice(lo - mine[0], hi - mine[0])))
        self._open[meta.request_id] = _SendRequest(meta, control, ep.seq, targets, followers)

    def _send_item(self, r: _SendRequest, pair: _Pair, item: int, body: torch.Tensor, heads=None) -> None:
        h = _Header(Msg.ITEM, r.seq, item, body.numel(), heads)
        r.pending.append((pair, self._post(pair, h, body), body))

    def _mark_sent(self, r: _SendRequest, item: int) -> None:
        if item in r.sent:
            raise ValueError(f"item {item} of request {r.meta.request_id!r} sent twice")
        r.sent.add(item)

    def send_layer(self, request_id, layer, blocks, src_block_ids=None):
        r = self._open[request_id]
        check_layer_blocks(self.layout, r.meta, layer, blocks, src_block_ids)
        self._mark_sent(r, layer - r.meta.layer_start)
        for pair, theirs, mine in r.targets:
            part = blocks if mine == slice(0, self.layout.num_kv_heads) else blocks[..., mine, :]
            packed = gather_blocks(part, src_block_ids)
            self._send_item(r, pair, layer - r.meta.layer_start, self._as_bytes(packed), theirs)

    def send_payload(self, request_id, name, tensor):
        r = self._open[request_id]
        item = r.meta.payload_index(name)
        spec = r.meta.payloads[item - len(r.meta.layers)]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.torch_dtype:
            raise ValueError(f"payload {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, expected {spec}")
        self._mark_sent(r, item)
        self._send_item(r, r.control, item, self._as_bytes(tensor))

    def _drain(self, r: _SendRequest, timeout: float) -> None:
        for pair, handle, _ in r.pending:
            try:
                handle.wait(timeout)
            except Exception as e:
                pair.broken = True
                raise TransferTimeout(f"request {r.meta.request_id!r}: send not done: {e}") from e
        r.pending.clear()

    def _end(self, r: _SendRequest, h: _Header) -> None:
        for pair in (r.control, *r.followers):
            if not pair.broken:
                self._post(pair, h)

    def finish(self, request_id, *, timeout):
        r = self._open.pop(request_id)
        self._drain(r, timeout)
        missing = sorted(set(range(r.meta.num_items)) - r.sent)
        self._end(r, _Header(Msg.FINISH, r.seq, extra=missing))
        if missing:
            raise TransferError(f"request {request_id!r} failed: items {missing} were never sent")

    def abort(self, request_id):
        r = self._open.pop(request_id, None)
        if r is None:
            return
        try:
            self._end(r, _Header(Msg.ABORT, r.seq))
            self._drain(r, 10.0)  # the receiver drains bodies of cancelled requests
        except Exception:
            log.warning("KV abort of %r: link to receiver lost", request_id)

    def close(self):
        for rid in list(self._open):
            self.abort(rid)
        for pair in self._pairs.values():
            if not pair.broken:
                try:
                    self._post(pair, _Header(Msg.BYE, 0))
                except Exception:
                    pass
            pair.link.close()
        self._pairs.clear()
