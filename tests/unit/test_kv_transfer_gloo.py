"""gloo transport between two processes, each pair in its own process group."""

import pytest
import torch
import torch.distributed as dist

from kv_transfer.base import TransferCancelled, TransferStatus
from kv_transfer.layout import PayloadSpec
from kv_transfer.registry import get_backend
from tests.helpers.kv_transfer import DST_IDS, LAYOUT, SRC_IDS, TIMEOUT, source_cache, start_sender


def test_gloo_streams_layers_payload_and_abort():
    proc, commands, results = start_sender("gloo")
    rx = get_backend("gloo").Receiver(LAYOUT, host="127.0.0.1")
    try:
        kv = rx.allocate_cache(16)
        commands.put(("finish", rx.prepare("r1", DST_IDS, payloads=[PayloadSpec("img", (2, 3), "float16")]), 7, 4))
        for layer in range(4):
            rx.wait("r1", layers=[layer], timeout=TIMEOUT)
            assert torch.equal(kv[layer][:, DST_IDS], source_cache(7)[layer][:, SRC_IDS])
        assert rx.wait("r1", timeout=TIMEOUT).status is TransferStatus.DONE
        assert torch.equal(rx.recv_payload("r1", "img", timeout=1), torch.full((2, 3), 7.0, dtype=torch.float16))
        assert results.get(timeout=TIMEOUT) == ("ok", "r1")
        rx.release("r1")

        commands.put(("abort", rx.prepare("r2", [1, 2, 3, 4]), 8, 2))
        with pytest.raises(TransferCancelled):
            rx.wait("r2", timeout=TIMEOUT)
        rx.release("r2")
        commands.put(None)
        assert results.get(timeout=TIMEOUT)[0] in ("ok", "closed")
        assert not dist.is_initialized()  # no default group was created
    finally:
        rx.close()
        proc.join(timeout=TIMEOUT)
    assert proc.exitcode == 0
