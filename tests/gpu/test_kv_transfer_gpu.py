"""CUDA IPC (same GPU) and NCCL (two GPUs; three for tensor-parallel groups) transports, processes
via torch.multiprocessing."""

import importlib.util

import pytest
import torch
import torch.multiprocessing as mp

from kv_transfer.base import TransferStatus
from engine.kv_layout import KVLayout
from kv_transfer.layout import PayloadSpec
from kv_transfer.registry import get_backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
LAYOUT = KVLayout("tiny-llama", torch.float16, num_layers=4, num_kv_heads=2, head_dim=64, block_size=16)
SRC_IDS, DST_IDS = [3, 0, 1, 2], [7, 8, 9, 2]
TIMEOUT = 120.0


def source(device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(LAYOUT.cache_shape(6), generator=g).to(LAYOUT.torch_dtype).to(device)


def sender_main(backend: str, device: str, descs, results) -> None:
    torch.cuda.set_device(device)
    tx = get_backend(backend).Sender(LAYOUT, device=device)
    desc = descs.get()
    rid, src = desc.meta.request_id, source(device)
    tx.connect(desc)
    for layer in range(LAYOUT.num_layers):
        tx.send_layer(rid, layer, src[layer], src_block_ids=SRC_IDS)
    tx.send_payload(rid, "img", torch.ones(4, 8, device=device))
    tx.finish(rid, timeout=TIMEOUT)
    results.put("ok")
    descs.get()  # keep mappings alive until the receiver has checked
    tx.close()


def run_pair(backend: str, rx_device: str, tx_device: str) -> None:
    ctx = mp.get_context("spawn")
    descs, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=sender_main, args=(backend, tx_device, descs, results))
    proc.start()
    opts = {"host": "127.0.0.1"} if backend == "nccl" else {}
    rx = get_backend(backend).Receiver(LAYOUT, device=rx_device, **opts)
    try:
        kv = rx.allocate_cache(12)
        descs.put(rx.prepare("r1", DST_IDS, payloads=[PayloadSpec("img", (4, 8), "float32")]))
        for layer in range(LAYOUT.num_layers):
            rx.wait("r1", layers=[layer], timeout=TIMEOUT)
            assert torch.equal(kv[layer][:, DST_IDS], source(rx_device)[layer][:, SRC_IDS])
        assert rx.wait("r1", timeout=TIMEOUT).status is TransferStatus.DONE
        assert torch.equal(rx.recv_payload("r1", "img", timeout=1).cpu(), torch.ones(4, 8))
        assert results.get(timeout=TIMEOUT) == "ok"
        rx.release("r1")
        descs.put(None)
    finally:
        proc.join(timeout=TIMEOUT)
        rx.close()
    assert proc.exitcode == 0


def test_cuda_ipc_same_gpu():
    run_pair("cuda_ipc", "cuda:0", "cuda:0")


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_nccl_two_gpus():
    run_pair("nccl", "cuda:0", "cuda:1")


def _part(size: int, rank: int) -> KVLayout:
    n = LAYOUT.num_kv_heads // size
    return LAYOUT.with_heads(range(rank * n, (rank + 1) * n))


def tp_sender_main(size: int, rank: int, descs, results, backend: str = "cuda_ipc", device: str = "cuda:0") -> None:
    """Rank `rank` of a prefill group of `size`: sends its KV heads only."""
    torch.cuda.set_device(device)
    opts = {"host": "127.0.0.1"} if backend == "nccl" else {}
    tx = get_backend(backend).Sender(_part(size, rank), device=device, **opts)
    desc = descs.get()
    rid = desc.meta.request_id
    src = source(device)[:, :, :, :, _part(size, rank).kv_heads].contiguous()  # this rank's own cache
    tx.connect(desc)
    for layer in range(LAYOUT.num_layers):
        tx.send_layer(rid, layer, src[layer], src_block_ids=SRC_IDS)
    tx.finish(rid, timeout=TIMEOUT)
    results.put("ok")
    descs.get()
    tx.close()


def run_tp_groups(backend: str, a: int, b: int, tx_devices: list[str], rx_devices: list[str]) -> None:
    ctx = mp.get_context("spawn")
    queues, results = [ctx.Queue() for _ in range(a)], ctx.Queue()
    procs = [
        ctx.Process(target=tp_sender_main, args=(a, r, queues[r], results, backend, tx_devices[r])) for r in range(a)
    ]
    for p in procs:
        p.start()
    Receiver = get_backend(backend).Receiver
    opts = {"host": "127.0.0.1"} if backend == "nccl" else {}
    rx = Receiver(_part(b, 0), device=rx_devices[0], senders=a, **opts)
    others = [Receiver.rank_cache(_part(b, r), 12, torch.device(rx_devices[r])) for r in range(1, b)]
    try:
        caches = [rx.allocate_cache(12)] + [o.kv for o in others]
        if others:
            rx.add_ranks([(_part(b, r), o.handle) for r, o in enumerate(others, start=1)])
        desc = rx.prepare("r1", DST_IDS)
        for q in queues:
            q.put(desc)
        assert rx.wait("r1", timeout=TIMEOUT).status is TransferStatus.DONE
        got = torch.cat([c[:, :, DST_IDS].cpu() for c in caches], dim=4)
        assert torch.equal(got, source("cpu")[:, :, SRC_IDS])
        assert all(results.get(timeout=TIMEOUT) == "ok" for _ in procs)
        rx.release("r1")
        for q in queues:
            q.put(None)
    finally:
        for p in procs:
            p.join(timeout=TIMEOUT)
        rx.close()
        for o in others:
            o.close()
    assert all(p.exitcode == 0 for p in procs)


@pytest.mark.parametrize("a,b", [(2, 1), (1, 2), (2, 2)])
def test_cuda_ipc_between_tensor_parallel_groups(a, b):
    """Prefill TP a -> decode TP b on one GPU: each sending rank writes its heads into the device
    caches of the receiving ranks that hold them (no host staging)."""
    run_tp_groups("cuda_ipc", a, b, ["cuda:0"] * a, ["cuda:0"] * b)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="needs cupy")
@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="NCCL between TP groups needs three GPUs")
@pytest.mark.parametrize("a,b", [(2, 1), (1, 2)])
def test_nccl_between_tensor_parallel_groups(a, b):
    """Prefill TP a -> decode TP b over NCCL, every rank on its own GPU: each decode rank
    receives its heads from the prefill ranks that hold them, device to device."""
    devices = [f"cuda:{i}" for i in range(a + b)]
    run_tp_groups("nccl", a, b, devices[:a], devices[a:])
