"""In-process transport that lands every item instantly; for tests of the code around it.

The descriptor's endpoint holds the receiver object itself, so sender and receiver must live in
one process. `FakeReceiver.fail(rid, why)` injects a transport failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.base import (
    KVReceiver,
    KVSender,
    TransferBackend,
    TransferError,
    TransferState,
    TransferStatus,
)
from kv_transfer.blocks import check_layer_blocks, copy_blocks
from kv_transfer.layout import PayloadSpec, TransferDescriptor, TransferMetadata


@dataclass
class _Request:
    meta: TransferMetadata
    status: TransferStatus = TransferStatus.PENDING
    layers_done: set[int] = field(default_factory=set)
    payloads: dict[str, torch.Tensor] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True, eq=False)
class FakeEndpoint:
    receiver: FakeReceiver


class FakeReceiver(KVReceiver):
    backend_name = "fake"

    def __init__(self, layout, *, senders: int = 1) -> None:
        super().__init__(layout, senders=senders)
        self.requests: dict[str, _Request] = {}

    def prepare(self, request_id, dst_block_ids, *, num_tokens=None, layers=None, payloads: Sequence[PayloadSpec] = ()):
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already open")
        meta = self._make_metadata(request_id, dst_block_ids, num_tokens, layers, payloads)
        self.requests[request_id] = _Request(meta)
        return TransferDescriptor("fake", meta, self.layout, FakeEndpoint(self))

    def poll(self, request_id):
        r = self.requests[request_id]
        return TransferState(r.status, frozenset(r.layers_done), frozenset(r.payloads), r.error)

    def _payload(self, request_id, name):
        return self.requests[request_id].payloads[name]

    def fail(self, request_id: str, why: str) -> None:
        r = self.requests[request_id]
        r.status, r.error = TransferStatus.FAILED, why

    def _land(self, request_id: str) -> _Request:
        r = self.requests.get(request_id)
        if r is None or r.status.terminal and r.status is not TransferStatus.DONE:
            raise TransferError(f"request {request_id!r} is not open on the receiver")
        return r

    def _update(self, r: _Request) -> None:
        if len(r.layers_done) == len(r.meta.layers) and len(r.payloads) == len(r.meta.payloads):
            r.status = TransferStatus.DONE

    def release(self, request_id):
        self.requests.pop(request_id, None)

    def close(self):
        self.requests.clear()


class FakeSender(KVSender):
    backend_name = "fake"

    def __init__(self, layout) -> None:
        super().__init__(layout)
        self.open: dict[str, FakeReceiver] = {}

    def connect(self, desc):
        self._check_descriptor(desc)
        receiver = desc.endpoint.receiver
        r = receiver._land(desc.meta.request_id)
        r.status = TransferStatus.IN_PROGRESS
        receiver._update(r)
        self.open[desc.meta.request_id] = receiver

    def send_layer(self, request_id, layer, blocks, src_block_ids=None):
        receiver = self.open[request_id]
        r = receiver._land(request_id)
        check_layer_blocks(self.layout, r.meta, layer, blocks, src_block_ids)
        copy_blocks(receiver.kv[layer], r.meta.dst_block_ids, blocks, src_block_ids)
        r.layers_done.add(layer)
        receiver._update(r)

    def send_payload(self, request_id, name, tensor):
        receiver = self.open[request_id]
        r = receiver._land(request_id)
        r.meta.payload_index(name)
        r.payloads[name] = tensor.clone()
        receiver._update(r)

    def finish(self, request_id, *, timeout):
        receiver = self.open.pop(request_id)
        r = receiver._land(request_id)
        if r.status is not TransferStatus.DONE:
            r.status, r.error = TransferStatus.FAILED, "sender finished before sending every item"
            raise TransferError(f"request {request_id!r}: {r.error}")

    def abort(self, request_id):
        receiver = self.open.pop(request_id, None)
        r = receiver and receiver.requests.get(request_id)
        if r is not None and not r.status.terminal:
            r.status = TransferStatus.CANCELLED

    def close(self):
        for rid in list(self.open):
            self.abort(rid)


class FakeBackend(TransferBackend):
    name = "fake"
    Sender = FakeSender
    Receiver = FakeReceiver
