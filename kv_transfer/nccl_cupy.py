"""Cross-GPU transport over NCCL point-to-point, through CuPy's NCCL bindings.

Control is the TCPStore channel of channel.py; each (sender, receiver) pair gets its own
two-rank NcclCommunicator whose unique id the sender creates and publishes under the pair's
store prefix (so no default process group and no fixed port). Sends run on a dedicated stream
after an event on the producing stream; the receiver's pair thread receives each packed layer
into a GPU staging buffer, synchronises, scatters into the reserved blocks and synchronises
again before reporting the layer done. NCCL needs distinct GPUs for the two ranks.
"""

from __future__ import annotations

import pickle
import time
from datetime import timedelta

import cupy  # noqa: F401  (ImportError here tells the registry cupy is missing)
import torch
from cupy.cuda import nccl

from kv_transfer.base import TransferBackend
from kv_transfer.channel import ChannelReceiver, ChannelSender, Link


class _EventWait:
    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._event.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"NCCL send not complete after {timeout}s")
            time.sleep(1e-4)


class NcclLink(Link):
    def __init__(self, store, prefix: str, rank: int, device: torch.device, timeout: float) -> None:
        key = f"{prefix}/nccl_uid"
        if rank == 1:
            store.set(key, pickle.dumps(nccl.get_unique_id()))
        store.wait([key], timedelta(seconds=timeout))
        uid = pickle.loads(store.get(key))
        self.device, self.peer = device, 1 - rank
        with cupy.cuda.Device(device.index):
            self.comm = nccl.NcclCommunicator(2, uid, rank)
        self.stream = torch.cuda.Stream(device)

    def send(self, tensor: torch.Tensor, tag: int) -> _EventWait:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(ready)
        with cupy.cuda.Device(self.device.index):
            self.comm.send(tensor.data_ptr(), tensor.numel(), nccl.NCCL_UINT8, self.peer, self.stream.cuda_stream)
        tensor.record_stream(self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        return _EventWait(done)

    def recv(self, tensor: torch.Tensor, tag: int) -> None:
        # Messages are processed in order on one stream, so NCCL's ordering replaces the tag.
        with cupy.cuda.Device(self.device.index):
            self.comm.recv(tensor.data_ptr(), tensor.numel(), nccl.NCCL_UINT8, self.peer, self.stream.cuda_stream)
        self.stream.synchronize()

    def close(self) -> None:
        try:
            self.comm.destroy()
        except Exception:
            pass


def _device(device) -> torch.device:
    d = torch.device(device or f"cuda:{torch.cuda.current_device()}")
    return torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())


class NcclReceiver(ChannelReceiver):
    backend_name = "nccl"

    def __init__(self, layout, *, device=None, **kw) -> None:
        self.device = _device(device)
        super().__init__(layout, **kw)

    @classmethod
    def _for_rank(cls, layout, device):
        return cls(layout, device=device)

    @property
    def _staging_device(self) -> torch.device:
        return self.device

    def allocate_cache(self, num_blocks: int) -> torch.Tensor:
        kv = self.layout.new_cache(num_blocks, self.device)
        self.register_cache(kv)
        return kv

    def _make_link(self, store, prefix):
        torch.cuda.set_device(self.device)  # runs on the pair thread
        return NcclLink(store, prefix, 0, self.device, self.timeout)

    def _sync_landed(self) -> None:
        torch.cuda.current_stream(self.device).synchronize()


class NcclSender(ChannelSender):
    backend_name = "nccl"

    def __init__(self, layout, *, device=None, **kw) -> None:
        super().__init__(layout, **kw)
        self.device = _device(device)

    def _make_link(self, store, prefix):
        return NcclLink(store, prefix, 1, self.device, self.timeout)


class NcclBackend(TransferBackend):
    name = "nccl"
    Sender = NcclSender
    Receiver = NcclReceiver
