"""shm transport between two processes: streaming, abort, killed sender, leak checks."""

import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp

from kv_transfer import segment
from kv_transfer.base import TransferCancelled, TransferError, TransferFailed, TransferStatus
from kv_transfer.layout import PayloadSpec
from kv_transfer.registry import get_backend
from tests.helpers.kv_transfer import DST_IDS, LAYOUT, SRC_IDS, TIMEOUT, source_cache, start_sender


def test_streams_layer_by_layer_then_abort_and_leaves_no_segment():
    proc, commands, results = start_sender("shm")
    rx = get_backend("shm").Receiver(LAYOUT)
    try:
        kv = rx.allocate_cache(16)
        desc = rx.prepare("r1", DST_IDS, num_tokens=14, payloads=[PayloadSpec("img", (3, 5), "float32")])
        assert len(segment.list_segments()) == 3  # cache, control table, payloads
        commands.put(("finish", desc, 1, 4))
        for layer in range(4):  # the receiver waits for each layer in turn
            state = rx.wait("r1", layers=[layer], timeout=TIMEOUT)
            assert layer in state.layers_done
            assert torch.equal(kv[layer][:, DST_IDS], source_cache(1)[layer][:, SRC_IDS])
        assert rx.wait("r1", timeout=TIMEOUT).status is TransferStatus.DONE
        assert results.get(timeout=TIMEOUT) == ("ok", "r1")
        assert torch.equal(rx.recv_payload("r1", "img", timeout=1), torch.full((3, 5), 1.0))
        rx.release("r1")

        desc = rx.prepare("r2", [1, 2, 3, 4])
        commands.put(("abort", desc, 2, 2))
        with pytest.raises(TransferCancelled):
            rx.wait("r2", timeout=TIMEOUT)
        assert results.get(timeout=TIMEOUT) == ("ok", "r2")
        rx.release("r2")
        commands.put(None)
        assert results.get(timeout=TIMEOUT) == ("closed", None)
    finally:
        rx.close()
        proc.join(timeout=TIMEOUT)
    assert segment.list_segments() == []


def test_killed_sender_is_detected_and_nothing_leaks():
    proc, commands, results = start_sender("shm")
    rx = get_backend("shm").Receiver(LAYOUT)
    try:
        rx.allocate_cache(16)
        commands.put(("hang", rx.prepare("r1", DST_IDS), 3, 2))
        rx.wait("r1", layers=[0, 1], timeout=TIMEOUT)
        assert results.get(timeout=TIMEOUT) == ("ok", "r1")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=TIMEOUT)
        with pytest.raises(TransferFailed, match="died"):
            rx.wait("r1", timeout=TIMEOUT)
        rx.release("r1")
    finally:
        rx.close()
    assert segment.list_segments() == []


def test_release_fences_a_late_sender():
    backend = get_backend("shm")
    with backend.Receiver(LAYOUT) as rx, backend.Sender(LAYOUT, async_copy=False) as tx:
        rx.allocate_cache(16)
        tx.connect(rx.prepare("r1", DST_IDS))
        tx.send_layer("r1", 0, source_cache(4)[0], SRC_IDS)
        rx.release("r1")
        with pytest.raises(TransferError, match="released"):
            tx.send_layer("r1", 1, source_cache(4)[1], SRC_IDS)
        tx.abort("r1")
    assert segment.list_segments() == []


def receiver_that_dies(descriptors) -> None:
    rx = get_backend("shm").Receiver(LAYOUT)
    rx.allocate_cache(16)
    descriptors.put(rx.prepare("r1", DST_IDS, payloads=[PayloadSpec("img", (3, 5), "float32")]))
    signal.pause()


def test_a_killed_receiver_leaves_no_memory_behind():
    """SIGKILL of a receiver frees its cache, control table and payload segments with no reaper:
    they have no name anywhere (/dev/shm stays empty), the kernel frees them once no process
    holds them, and a sender that mapped them lets go once its request is aborted (WATCH_S)."""
    from kv_transfer.shm import WATCH_S

    ctx = mp.get_context("spawn")
    descriptors = ctx.Queue()
    proc = ctx.Process(target=receiver_that_dies, args=(descriptors,), daemon=True)
    proc.start()
    desc = descriptors.get(timeout=TIMEOUT)
    mine = lambda: [n for n in segment.held_segments() if f"-p{proc.pid}-" in n]  # noqa: E731
    assert sorted(n.rsplit("-", 1)[1] for n in mine()) == ["ctl", "kv", "pl"]
    assert not list(segment.Path("/dev/shm").glob("triptych-*"))
    with get_backend("shm").Sender(LAYOUT, async_copy=False) as tx:
        tx.connect(desc)
        tx.send_layer("r1", 0, source_cache(5)[0], SRC_IDS)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=TIMEOUT)
        assert mine() and segment.orphaned_segments()  # this sender still maps the dead receiver's
        tx.abort("r1")
        deadline = time.monotonic() + 5 * WATCH_S
        while mine() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not mine(), mine()
        with pytest.raises(FileNotFoundError, match="is gone"):
            tx.connect(desc)  # nothing of it can be attached again
    assert not segment.orphaned_segments()
