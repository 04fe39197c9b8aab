import pytest
import torch

from kv_transfer.base import TransferCancelled, TransferError, TransferFailed, TransferStatus, TransferTimeout
from engine.kv_layout import KVLayout
from kv_transfer.layout import PayloadSpec
from kv_transfer.registry import get_backend

LAYOUT = KVLayout("tiny-llama", torch.float32, num_layers=3, num_kv_heads=2, head_dim=4, block_size=2)


@pytest.fixture
def pair():
    backend = get_backend("fake")
    rx, tx = backend.Receiver(LAYOUT), backend.Sender(LAYOUT)
    rx.allocate_cache(8)
    yield rx, tx
    tx.close()
    rx.close()


def test_streams_layers_and_payload(pair):
    rx, tx = pair
    src = torch.randn(LAYOUT.cache_shape(4))
    desc = rx.prepare("r1", [6, 2], num_tokens=3, payloads=[PayloadSpec("img", (2, 3), "float32")])
    tx.connect(desc)
    for layer in range(3):
        tx.send_layer("r1", layer, src[layer], src_block_ids=[1, 3])
        assert layer in rx.wait("r1", layers=[layer], timeout=1).layers_done
    emb = torch.randn(2, 3)
    tx.send_payload("r1", "img", emb)
    tx.finish("r1", timeout=1)
    assert rx.wait("r1", timeout=1).status is TransferStatus.DONE
    assert torch.equal(rx.kv[:, :, [6, 2]], src[:, :, [1, 3]])
    assert torch.equal(rx.recv_payload("r1", "img", timeout=1), emb)
    rx.release("r1")
    assert not rx.requests


def test_abort_fail_timeout_and_missing_layers(pair):
    rx, tx = pair
    tx.connect(rx.prepare("a", [0]))
    tx.abort("a")
    with pytest.raises(TransferCancelled):
        rx.wait("a", timeout=1)
    tx.connect(rx.prepare("f", [1]))
    rx.fail("f", "link down")
    with pytest.raises(TransferFailed, match="link down"):
        rx.wait("f", timeout=1)
    tx.connect(rx.prepare("t", [2]))
    with pytest.raises(TransferTimeout):
        rx.wait("t", layers=[0], timeout=0.01)
    with pytest.raises(TransferError, match="before sending every item"):
        tx.finish("t", timeout=1)
    assert rx.poll("t").status is TransferStatus.FAILED
