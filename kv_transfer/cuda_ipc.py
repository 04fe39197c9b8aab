"""Same-GPU transport over CUDA IPC (two processes sharing one device).

The receiver's cache is an ordinary CUDA tensor; each descriptor carries a fresh IPC export of
it (torch.multiprocessing.reductions.reduce_tensor, i.e. `storage._share_cuda_()` plus torch's
producer ref-counter), and the sender opens it with `rebuild_cuda_tensor`, which reuses an
already opened mapping and returns the extra ref-count. The sender copies each layer's blocks
straight into the destination blocks on its own stream (non_blocking, after an event on the
producing stream), then a background thread waits for the copy's event and raises the item's
flag in the host shared-memory ControlBlock, exactly as the shm transport does.

NCCL refuses two ranks on one GPU, so this is the same-GPU path; across GPUs use nccl_cupy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from kv_transfer.base import KVReceiver, RankCache, TransferBackend
from kv_transfer.blocks import copy_blocks
from kv_transfer.layout import PayloadSpec, TransferMetadata
from kv_transfer.shm import ShmEndpoint, ShmReceiver, ShmSender


def export_cuda(t: torch.Tensor) -> tuple:
    """Picklable IPC handle of a CUDA tensor (one producer ref-count per export)."""
    rebuild, args = reduce_tensor(t)
    assert rebuild is rebuild_cuda_tensor, "export_cuda takes CUDA tensors only"
    return args


def import_cuda(handle: tuple) -> torch.Tensor:
    return rebuild_cuda_tensor(*handle)


class CudaIpcReceiver(ShmReceiver):
    backend_name = "cuda_ipc"

    def __init__(self, layout, *, device: str | torch.device | None = None, **kw) -> None:
        super().__init__(layout, **kw)
        self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")

    def allocate_cache(self, num_blocks: int) -> torch.Tensor:
        kv = self.layout.new_cache(num_blocks, self.device)
        self.register_cache(kv)
        return kv

    def register_cache(self, kv: torch.Tensor) -> None:
        if not kv.is_cuda:
            raise ValueError("the CUDA IPC receiver needs a CUDA cache tensor")
        KVReceiver.register_cache(self, kv)

    def _cache_handle(self) -> object:
        return export_cuda(self.kv) if self.kv is not None else None

    @staticmethod
    def rank_cache(layout, num_blocks: int, device) -> RankCache:
        kv = layout.new_cache(num_blocks, device)
        return RankCache(kv, export_cuda(kv), lambda: None)  # freed with the rank's process

    def _alloc_payloads(self, request_id: str, specs: Sequence[PayloadSpec]):
        tensors = {s.name: torch.empty(s.shape, dtype=s.torch_dtype, device=self.device) for s in specs}
        return tuple(export_cuda(t) for t in tensors.values()), tensors, None


class CudaIpcSender(ShmSender):
    backend_name = "cuda_ipc"

    def __init__(self, layout, *, device: str | torch.device | None = None, async_copy: bool = True) -> None:
        super().__init__(layout, async_copy=async_copy)
        self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
        self._stream = torch.cuda.Stream(self.device)

    def _open_cache(self, layout, handle: object, rank: int, cached: torch.Tensor | None) -> torch.Tensor:
        # Rank 0's handle is a fresh export per descriptor: rebuilding it settles that export's
        # ref-count. A follower rank exports its cache once (rank_cache): opened once per sender.
        if rank > 0 and cached is not None:
            return cached
        return import_cuda(handle)

    def _open_payloads(self, meta: TransferMetadata, ep: ShmEndpoint) -> dict[str, torch.Tensor]:
        return {s.name: import_cuda(h) for s, h in zip(meta.payloads, ep.payloads)}

    def _enqueue(self, src: torch.Tensor, copy) -> callable:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(src.device))
        self._stream.wait_event(ready)  # the copy starts after the layer was computed
        with torch.cuda.stream(self._stream):
            copy()
        src.record_stream(self._stream)
        done = torch.cuda.Event()
        done.record(self._stream)
        return done.synchronize  # run on the copy thread, before the flag is raised

    def _start_copy(self, dst, dst_ids, src, src_ids):
        return self._enqueue(src, lambda: copy_blocks(dst, dst_ids, src, src_ids, non_blocking=True))

    def _start_copy_payload(self, dst, src):
        return self._enqueue(src, lambda: dst.copy_(src, non_blocking=True))


class CudaIpcBackend(TransferBackend):
    name = "cuda_ipc"
    Sender = CudaIpcSender
    Receiver = CudaIpcReceiver
