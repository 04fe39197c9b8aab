"""POSIX shared-memory segments (files under /dev/shm) mapped as torch tensors.

Names are `triptych-<uuid>-p<creator pid>-<kind>`: unique per segment, and the creator pid lets
`list_segments` / `cleanup_segments` find what one process owns, and `cleanup_stale` remove
what a dead process left. Only the creator unlinks; mappings stay valid after unlink until the
last tensor viewing them is freed.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch

SHM_DIR = Path("/dev/shm")
PREFIX = "triptych-"
_NAME = re.compile(rf"^{PREFIX}[0-9a-f]{{32}}-p(\d+)-[a-z0-9_]+$")


def _map(fd: int, nbytes: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # pre-fault: no first-touch stalls
    return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class Segment:
    """One mapped segment. `owner` segments are unlinked by unlink()/close()."""

    def __init__(self, name: str, buf: mmap.mmap, owner: bool) -> None:
        self.name, self.buf, self.owner = name, buf, owner
        self.nbytes = len(buf)

    @classmethod
    def create(cls, kind: str, nbytes: int) -> Segment:
        name = f"{PREFIX}{uuid.uuid4().hex}-p{os.getpid()}-{kind}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            return cls(name, _map(fd, max(nbytes, 1)), owner=True)
        except BaseException:
            os.unlink(SHM_DIR / name)
            raise
        finally:
            os.close(fd)

    @classmethod
    def attach(cls, name: str) -> Segment:
        if not _NAME.match(name):
            raise ValueError(f"not a triptych segment name: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            return cls(name, _map(fd, os.fstat(fd).st_size), owner=False)
        finally:
            os.close(fd)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        """A tensor viewing bytes [offset, offset + numel*itemsize) of the segment."""
        count = int(np.prod(shape, dtype=np.int64))
        return torch.frombuffer(self.buf, dtype=dtype, count=count, offset=offset).view(shape)

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def unlink(self) -> None:
        """Remove the name (owner only, idempotent); live mappings keep the memory."""
        if self.owner:
            try:
                os.unlink(SHM_DIR / self.name)
            except FileNotFoundError:
                pass
            self.owner = False


def list_segments(pid: int | None = None) -> list[str]:
    """Names of triptych segments created by `pid` (default: this process); None-safe glob."""
    pid = os.getpid() if pid is None else pid
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}*") if _owner(p.name) == pid)


def list_all_segments() -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}*") if _owner(p.name) is not None)


def cleanup_segments(pid: int | None = None) -> list[str]:
    """Unlink every segment created by `pid` (default: this process); returns the names."""
    names = list_segments(pid)
    for name in names:
        try:
            os.unlink(SHM_DIR / name)
        except FileNotFoundError:
            pass
    return names


def stale_segments() -> list[str]:
    """Segments whose creator process is gone: a leak unless someone reaps them."""
    return [name for name in list_all_segments() if not pid_alive(_owner(name))]


def cleanup_stale() -> list[str]:
    """Unlink segments whose creator process is gone (e.g. a killed receiver)."""
    removed = []
    for name in list_all_segments():
        pid = _owner(name)
        if pid is not None and not pid_alive(pid):
            removed += cleanup_segments(pid)
    return sorted(set(removed))


def _owner(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
