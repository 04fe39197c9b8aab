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
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.base import (
    KVReceiver,
    KVSender,
    TransferError,
    TransferState,
    TransferStatus,
    TransferTimeout,
)
from kv_transfer.blocks import check_layer_blocks, copy_blocks, gather_blocks
from kv_transfer.layout import TransferDescriptor, TransferMetadata

log = logging.getLogger(__name__)
_CLOSE = b"__close__"
_FOREVER = timedelta(days=7)


class Msg(enum.IntEnum):
    CONNECT = 1
    ITEM = 2
    FINISH = 3
    ABORT = 4
    BYE = 5


def default_host() -> str:
    """This node's address as the other nodes see it (hostname lookup, else loopback)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class ChannelEndpoint:
    receiver_id: str
    host: str
    port: int
    seq: int  # receiver's number for the request, carried in every header


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
    status: TransferStatus = TransferStatus.PENDING
    layers_done: set[int] = field(default_factory=set)
    payloads_done: set[str] = field(default_factory=set)
    error: str | None = None
    pair: int | None = None


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
        self._threads = [threading.Thread(target=self._accept, name="kv-accept", daemon=True)]
        self._threads[0].start()

    @abstractmethod
    def _make_link(self, store: dist.Store, prefix: str) -> Link: ...

    @property
    def _staging_device(self) -> torch.device:
        return torch.device("cpu")

    def _sync_landed(self) -> None:
        """Make the scatter of the last item complete before it is reported done."""

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
            if self._wait_key(store, f"hello/{i}") is None:
                return
            t = threading.Thread(target=self._serve_pair, args=(i,), name=f"kv-pair-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve_pair(self, i: int) -> None:
        store = self._client()
        try:
            link = self._make_link(store, f"pair/{i}/link")
        except Exception:
            log.exception("KV pair %d: link setup failed", i)
            return
        staging = torch.empty(0, dtype=torch.uint8, device=self._staging_device)
        try:
            for n in itertools.count():
                raw = self._wait_key(store, f"pair/{i}/msg/{n}")
                if raw is None:
                    return
                kind, seq, item, nbytes = pickle.loads(raw)
                if kind == Msg.BYE:
                    return
                if kind == Msg.ITEM:
                    if staging.numel() < nbytes:
                        staging = torch.empty(nbytes, dtype=torch.uint8, device=self._staging_device)
                    link.recv(staging[:nbytes], n)
                    self._land(seq, item, staging[:nbytes])
                else:
                    self._control(i, Msg(kind), seq)
        except Exception as e:  # link broken (peer died): fail what the pair was carrying
            with self._lock:
                for r in self._by_seq.values():
                    if r.pair == i and not r.status.terminal:
                        r.status, r.error = TransferStatus.FAILED, f"link to sender lost: {e}"
        finally:
            link.close()

    def _control(self, pair: int, kind: Msg, seq: int) -> None:
        with self._lock:
            r = self._by_seq.get(seq)
            if r is None or r.status.terminal:
                return
            if kind == Msg.CONNECT:
                r.status, r.pair = TransferStatus.IN_PROGRESS, pair
            elif kind == Msg.ABORT:
                r.status, r.error = TransferStatus.CANCELLED, "aborted by sender"
            elif kind == Msg.FINISH:
                r.status, r.error = TransferStatus.FAILED, "sender finished before sending every item"

    def _land(self, seq: int, item: int, body: torch.Tensor) -> None:
        with self._lock:
            r = self._by_seq.get(seq)
        if r is None or r.status.terminal:
            return  # released or ended: the body was drained, nothing to write
        meta, n_layers = r.meta, len(r.meta.layers)
        if item < n_layers:
            blocks = body.view(self.layout.torch_dtype).view(self.layout.layer_blocks_shape(len(meta.dst_block_ids)))
            copy_blocks(self.kv[meta.layer_start + item], meta.dst_block_ids, blocks)
        else:
            dst = r.payloads[meta.payloads[item - n_layers].name]
            dst.view(-1).view(torch.uint8).copy_(body)
        self._sync_landed()
        with self._lock:
            if item < n_layers:
                r.layers_done.add(meta.layer_start + item)
            else:
                r.payloads_done.add(meta.payloads[item - n_layers].name)
            if len(r.layers_done) + len(r.payloads_done) == meta.num_items and not r.status.terminal:
                r.status = TransferStatus.DONE

    # -- KVReceiver ----------------------------------------------------------------------
    def prepare(self, request_id, dst_block_ids, *, num_tokens=None, layers=None, payloads=()):
        meta = self._make_metadata(request_id, dst_block_ids, num_tokens, layers, payloads)
        tensors = {
            p.name: torch.empty(p.shape, dtype=p.torch_dtype, device=self._staging_device) for p in meta.payloads
        }
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already open")
            seq = next(self._seqs)
            r = self._requests[request_id] = self._by_seq[seq] = _RecvRequest(meta, seq, tensors)
            if meta.num_items == 0:
                r.status = TransferStatus.DONE
        endpoint = ChannelEndpoint(self.receiver_id, self.host, self.port, seq)
        return TransferDescriptor(self.backend_name, meta, self.layout, endpoint)

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

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiting.values())
            self._requests.clear()
            self._by_seq.clear()
        for key in waiting:
            self._store.set(key, _CLOSE)  # the waiting thread's own client is busy in wait()
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
    pair: _Pair
    seq: int
    sent: set[int] = field(default_factory=set)
    pending: list[tuple[object, torch.Tensor]] = field(default_factory=list)  # (handle, body)


class ChannelSender(KVSender):
    def __init__(self, layout, *, host: str | None = None, timeout: float = 120.0) -> None:
        super().__init__(layout)
        self.host = host or default_host()
        self.timeout = timeout
        self._pairs: dict[str, _Pair] = {}
        self._open: dict[str, _SendRequest] = {}

    @abstractmethod
    def _make_link(self, store: dist.Store, prefix: str) -> Link: ...

    def _pair(self, ep: ChannelEndpoint) -> _Pair:
        pair = self._pairs.get(ep.receiver_id)
        if pair is None or pair.broken:
            store = dist.TCPStore(ep.host, ep.port, is_master=False, timeout=timedelta(seconds=self.timeout))
            i = store.add("npairs", 1) - 1
            store.set(f"hello/{i}", b"")
            pair = self._pairs[ep.receiver_id] = _Pair(store, self._make_link(store, f"pair/{i}/link"), i)
        return pair

    def _post(self, pair: _Pair, kind: Msg, seq: int, item: int = -1, body: torch.Tensor | None = None):
        n = pair.next_msg
        pair.next_msg += 1
        nbytes = 0 if body is None else body.numel()
        pair.store.set(f"pair/{pair.index}/msg/{n}", pickle.dumps((int(kind), seq, item, nbytes)))
        return None if body is None else pair.link.send(body, n)

    def _as_bytes(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1).view(torch.uint8)

    def connect(self, desc):
        self._check_descriptor(desc)
        meta, ep = desc.meta, desc.endpoint
        if meta.request_id in self._open:
            raise ValueError(f"request {meta.request_id!r} is already connected")
        pair = self._pair(ep)
        self._post(pair, Msg.CONNECT, ep.seq)
        self._open[meta.request_id] = _SendRequest(meta, pair, ep.seq)

    def _send_item(self, r: _SendRequest, item: int, body: torch.Tensor) -> None:
        if item in r.sent:
            raise ValueError(f"item {item} of request {r.meta.request_id!r} sent twice")
        r.sent.add(item)
        r.pending.append((self._post(r.pair, Msg.ITEM, r.seq, item, body), body))

    def send_layer(self, request_id, layer, blocks, src_block_ids=None):
        r = self._open[request_id]
        check_layer_blocks(self.layout, r.meta, layer, blocks, src_block_ids)
        packed = gather_blocks(blocks, src_block_ids)
        self._send_item(r, layer - r.meta.layer_start, self._as_bytes(packed))

    def send_payload(self, request_id, name, tensor):
        r = self._open[request_id]
        item = r.meta.payload_index(name)
        spec = r.meta.payloads[item - len(r.meta.layers)]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.torch_dtype:
            raise ValueError(f"payload {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, expected {spec}")
        self._send_item(r, item, self._as_bytes(tensor))

    def _drain(self, r: _SendRequest, timeout: float) -> None:
        for handle, _ in r.pending:
            try:
                handle.wait(timeout)
            except Exception as e:
                r.pair.broken = True
                raise TransferTimeout(f"request {r.meta.request_id!r}: send not done: {e}") from e
        r.pending.clear()

    def finish(self, request_id, *, timeout):
        r = self._open.pop(request_id)
        self._drain(r, timeout)
        missing = sorted(set(range(r.meta.num_items)) - r.sent)
        self._post(r.pair, Msg.FINISH, r.seq)
        if missing:
            raise TransferError(f"request {request_id!r} failed: items {missing} were never sent")

    def abort(self, request_id):
        r = self._open.pop(request_id, None)
        if r is None or r.pair.broken:
            return
        try:
            self._post(r.pair, Msg.ABORT, r.seq)
            self._drain(r, 10.0)  # the receiver drains bodies of cancelled requests
        except Exception:
            log.warning("KV abort of %r: link to receiver lost", request_id)

    def close(self):
        for rid in list(self._open):
            self.abort(rid)
        for pair in self._pairs.values():
            if not pair.broken:
                try:
                    self._post(pair, Msg.BYE, 0)
                except Exception:
                    pass
            pair.link.close()
        self._pairs.clear()
