"""Where an engine runs: the device setting of `EngineConfig` and of a deploy pool, checked once
(`check_device`) and resolved once per engine (`resolve_placement`) into a `Placement` that every
part of the engine takes its device and dtype from.

    auto    the GPU Ray assigned this process when torch sees one, else the CPU. Ray sets
            CUDA_VISIBLE_DEVICES for an actor that reserves GPUs (and hides them from one that
            reserves none), so the assigned GPU is `cuda:0` inside the actor.
    cpu     the CPU.
    cuda    the current CUDA device (`cuda:0` unless the process changed it).
    cuda:N  CUDA device N among those this process sees.

A setting that asks for a GPU on a machine where torch sees none (or fewer than N + 1) raises
DeviceError naming the pool (when the settings are a pool's) and this node: such a worker fails
at start, never silently falls back to the CPU. So does a CUDA setting where Triton (the `gpu`
extra: the CUDA path's attention kernels) is not installed.

Without an explicit dtype, the engine runs bfloat16 on CUDA and float32 on the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import EngineError

if TYPE_CHECKING:  # torch loads only when a device is resolved: the deploy config checks settings without it
    import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?")


class DeviceError(EngineError):
    """A device setting this process cannot honour (no CUDA device, or not that one)."""


def check_device(value: object, field: str = "EngineConfig.device") -> str:
    """`value` if it is a device setting (auto, cpu, cuda, cuda:N), else ValueError naming `field`."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise ValueError(f"{field} must be {DEVICE_CHOICES}, got {value!r}")
    return value


def wants_gpu(device: str) -> bool:
    """True for a setting that can only be served by a CUDA device (cuda, cuda:N)."""
    return device.startswith("cuda")


def default_dtype(device: torch.device) -> str:
    """The dtype an engine runs in when its settings name none."""
    return "bfloat16" if device.type == "cuda" else "float32"


@dataclass(frozen=True)
class Placement:
    """The resolved device and dtype of one engine: its weights, KV cache, attention metadata
    and sampling all live on `device` (an indexed device: `cuda:0`, never bare `cuda`)."""

    device: torch.device
    dtype: str  # a torch dtype name


def resolve_placement(device: str, dtype: str | None = None, pool: str | None = None) -> Placement:
    """The Placement of a (checked) device setting in this process; DeviceError when it asks for
    a GPU this node does not have. `pool` names the deploy pool the settings are for (in the error)."""
    resolved = resolve_device(device, pool)
    return Placement(resolved, dtype or default_dtype(resolved))


def resolve_device(device: str, pool: str | None = None) -> torch.device:
    """The torch device of a device setting in this process (module docstring)."""
    import torch

    check_device(device)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{_who(pool)} asks for a GPU (device {device!r}), but {_node()} has none: {_why_no_cuda()}")
    index = torch.cuda.current_device() if device in ("auto", "cuda") else int(device.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{_who(pool)} asks for device {device!r}, but {_node()} has {count} CUDA device(s) visible to this "
            f"process (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    if importlib.util.find_spec("triton") is None:
        raise DeviceError(
            f"{_who(pool)} runs on CUDA, whose attention kernels are Triton's, but {_node()} has no triton module: "
            "install it with: pip install 'triptych[gpu]'"
        )
    return torch.device("cuda", index)


def _who(pool: str | None) -> str:
    return f"pool {pool!r}" if pool else "the engine"


def _node() -> str:
    from engine.worker_api import node_id

    return f"node {node_id()} (host {socket.gethostname()})"


def _why_no_cuda() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is empty (a Ray worker that reserves no GPU sees none: set num_gpus)"
    return f"torch finds no CUDA device (CUDA_VISIBLE_DEVICES={visible!r})"
