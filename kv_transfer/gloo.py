"""Cross-node CPU transport over torch.distributed gloo.

Each (sender, receiver) pair gets its own two-rank ProcessGroupGloo built directly on a
PrefixStore of the receiver's TCPStore: no init_process_group, so the default group, if any,
is never touched. Layers travel packed ([2, n, block_size, Hkv, D], contiguous bytes); the
receiver lands them in a staging buffer and scatters them into the reserved blocks (channel.py).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from kv_transfer.base import TransferBackend
from kv_transfer.channel import ChannelReceiver, ChannelSender, Link


class _GlooSend:
    def __init__(self, work) -> None:
        self._work = work

    def wait(self, timeout: float) -> None:
        self._work.wait(timedelta(seconds=timeout))


class GlooLink(Link):
    def __init__(self, store: dist.Store, prefix: str, rank: int, host: str, timeout: float) -> None:
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts._timeout = timedelta(seconds=timeout)
        self._pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, opts)
        self._peer = 1 - rank

    def send(self, tensor: torch.Tensor, tag: int) -> _GlooSend:
        return _GlooSend(self._pg.send([tensor], self._peer, tag % (1 << 31)))

    def recv(self, tensor: torch.Tensor, tag: int) -> None:
        self._pg.recv([tensor], self._peer, tag % (1 << 31)).wait()

    def close(self) -> None:
        self._pg = None


class GlooReceiver(ChannelReceiver):
    backend_name = "gloo"

    def _make_link(self, store, prefix):
        return GlooLink(store, prefix, 0, self.host, self.timeout)


class GlooSender(ChannelSender):
    backend_name = "gloo"

    def _make_link(self, store, prefix):
        return GlooLink(store, prefix, 1, self.host, self.timeout)


class GlooBackend(TransferBackend):
    name = "gloo"
    Sender = GlooSender
    Receiver = GlooReceiver
