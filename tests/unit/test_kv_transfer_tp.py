"""KV between tensor-parallel groups: prefill TP a -> decode TP b, over shared memory (one node)
and over gloo (across nodes).

Each sender holds one rank's KV heads of a source cache; the receiving ranks each hold a range of
the heads; after the transfer every receiving rank holds exactly its heads of the source blocks,
written by the senders that hold them (kv_transfer/shm.py in place, kv_transfer/channel.py as
messages to each rank's receiver)."""

from __future__ import annotations

import pytest
import torch

from engine.kv_layout import KVLayout
from kv_transfer.base import TransferCancelled, TransferStatus
from kv_transfer.layout import HandshakeError
from kv_transfer.registry import get_backend
from kv_transfer.segment import list_segments
from kv_transfer.shm import ShmReceiver, ShmSender

WHOLE = KVLayout("tiny", "float32", num_layers=3, num_kv_heads=6, head_dim=4, block_size=4)
SRC_IDS = [1, 0, 4]
DST_IDS = [5, 2, 3]


def part(size: int, rank: int) -> KVLayout:
    n = WHOLE.num_kv_heads // size
    return WHOLE.with_heads(range(rank * n, (rank + 1) * n))


CPU = torch.device("cpu")


def receiver(backend: str, layout: KVLayout, senders: int = 1):
    extra = {"host": "127.0.0.1"} if backend == "gloo" else {}
    return get_backend(backend).Receiver(layout, senders=senders, **extra)


def sender(backend: str, layout: KVLayout):
    return get_backend(backend).Sender(layout, **({"host": "127.0.0.1"} if backend == "gloo" else {}))


def receiving_group(size: int, senders: int, num_blocks: int = 8, backend: str = "shm"):
    """Rank 0's receiver and every rank's cache (the followers' made by rank_cache)."""
    rx = receiver(backend, part(size, 0), senders)
    caches = [rx.allocate_cache(num_blocks)]
    followers = [type(rx).rank_cache(part(size, r), num_blocks, CPU) for r in range(1, size)]
    if followers:
        rx.add_ranks([(part(size, r), f.handle) for r, f in enumerate(followers, start=1)])
    caches += [f.kv for f in followers]
    return rx, caches, followers


PAIRS = [(1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (2, 3), (3, 2), (6, 2)]


@pytest.mark.parametrize(
    "backend,a,b", [("shm", a, b) for a, b in PAIRS] + [("gloo", a, b) for a, b in ((2, 1), (1, 2), (2, 3), (3, 2))]
)
def test_each_receiving_rank_gets_exactly_its_heads(backend, a, b):
    torch.manual_seed(a * 10 + b)
    source = torch.randn(WHOLE.cache_shape(6))  # the whole model's K/V on the prefill side
    rx, caches, followers = receiving_group(b, senders=a, backend=backend)
    senders = [sender(backend, part(a, r)) for r in range(a)]
    try:
        desc = rx.prepare("r1", DST_IDS, num_tokens=10)
        assert desc.layout == WHOLE  # senders see the group's whole layout
        for r, tx in enumerate(senders):
            local = source[:, :, :, :, part(a, r).kv_heads].contiguous()  # rank r's own cache
            tx.connect(desc)
            for layer in range(WHOLE.num_layers):
                tx.send_layer("r1", layer, local[layer], src_block_ids=SRC_IDS)
            tx.finish("r1", timeout=10)
            if r < a - 1:  # a layer has landed only when every sender's part has
                state = rx.poll("r1")
                assert state.status is TransferStatus.IN_PROGRESS and not state.layers_done
        assert rx.wait("r1", timeout=10).status is TransferStatus.DONE
        got = torch.cat([c[:, :, DST_IDS] for c in caches], dim=4)
        assert torch.equal(got, source[:, :, SRC_IDS])
        untouched = [i for i in range(8) if i not in DST_IDS]
        assert all(not c[:, :, untouched].any() for c in caches)
        rx.release("r1")
    finally:
        for tx in senders:
            tx.close()
        rx.close()
        for f in followers:
            f.close()
    assert not list_segments()


@pytest.mark.parametrize("backend", ["shm", "gloo"])
def test_one_sender_aborting_cancels_the_transfer(backend):
    rx, _, followers = receiving_group(2, senders=2, backend=backend)
    a, b = sender(backend, part(2, 0)), sender(backend, part(2, 1))
    try:
        desc = rx.prepare("r", [0, 1], num_tokens=8)
        a.connect(desc)
        b.connect(desc)
        a.send_layer("r", 0, torch.zeros(part(2, 0).layer_blocks_shape(2)))
        b.abort("r")
        with pytest.raises(TransferCancelled):
            rx.wait("r", timeout=10)
    finally:
        a.close(), b.close(), rx.close()
        for f in followers:
            f.close()


def test_a_follower_lands_nothing_for_a_released_transfer():
    """gloo: rank 0 released the request (its blocks may be reused) while a sender still sends:
    the follower rank's blocks stay as they were."""
    rx, caches, followers = receiving_group(2, senders=1, backend="gloo")
    tx = sender("gloo", WHOLE)
    try:
        desc = rx.prepare("r", [0, 1], num_tokens=8)
        tx.connect(desc)
        tx.send_layer("r", 0, torch.ones(WHOLE.layer_blocks_shape(2)))
        rx.wait("r", layers=[0], timeout=10)
        rx.release("r")
        tx.send_layer("r", 1, torch.ones(WHOLE.layer_blocks_shape(2)))
        tx.send_layer("r", 2, torch.ones(WHOLE.layer_blocks_shape(2)))
        tx.finish("r", timeout=10)
        probe = rx.prepare("probe", [2], num_tokens=1)  # a later transfer: lands after the first's bodies
        tx.connect(probe)
        for layer in range(WHOLE.num_layers):
            tx.send_layer("probe", layer, torch.full(WHOLE.layer_blocks_shape(1), 2.0))
        tx.finish("probe", timeout=10)
        rx.wait("probe", timeout=10)
        for c in caches:
            assert c[0, :, [0, 1]].eq(1).all() and not c[1:, :, [0, 1]].any()
            assert c[:, :, 2].eq(2).all()
    finally:
        tx.close(), rx.close()
        for f in followers:
            f.close()


def test_senders_that_do_not_make_up_the_heads_are_refused():
    rx, _, _ = receiving_group(1, senders=2)
    try:
        desc = rx.prepare("r", [0], num_tokens=4)
        with pytest.raises(HandshakeError, match="not one of the 2 equal parts"):
            ShmSender(part(3, 2)).connect(desc)  # a third of the heads, the third part
        with pytest.raises(HandshakeError, match="num_kv_heads"):
            ShmSender(part(3, 0)).connect(desc)  # 2 heads + 2 heads are not the model's 6
        with pytest.raises(HandshakeError, match="num_kv_heads"):
            ShmSender(WHOLE).connect(desc)  # one sender where two are expected
    finally:
        rx.close()


def test_ranks_must_cover_the_heads_from_zero():
    rx = ShmReceiver(part(3, 0))
    try:
        rx.allocate_cache(2)
        with pytest.raises(ValueError, match="not one range from 0"):
            rx.add_ranks([(part(3, 2), ("unused", 2))])
    finally:
        rx.close()


def test_transports_that_carry_one_rank_refuse_groups():
    with pytest.raises(ValueError, match="connects one sender to one cache"):
        get_backend("fake").Receiver(WHOLE, senders=2)
    with pytest.raises(ValueError, match="connects one sender to one cache"):
        get_backend("fake").Receiver.rank_cache(part(2, 1), 2, CPU)
