"""Shared memory between the processes of one node, mapped as torch tensors, that no crash can
strand.

A segment is anonymous memory (`memfd_create`): it has no name in /dev/shm or anywhere else, so
the kernel frees it when the last process holding it (its creator's file descriptor, or anyone's
mapping) lets go, whatever ends those processes (SIGKILL, OOM, a node's Ray dying). Nothing has to
be reaped, and nothing is left for a later start to find.

Another process on the node attaches through the creator's descriptor table: the segment's handle
is `triptych-<uuid>-p<creator pid>-<kind>-fd<fd>`, and `attach` opens `/proc/<pid>/fd/<fd>`,
then checks that what it opened is that very segment (a memfd of that name: a descriptor number
reused by another file is refused). Only the creator closes its descriptor (`unlink`, idempotent):
from then on no one can attach, and mappings stay valid until the last tensor viewing them is
freed. A creator's death closes it too. Attaching needs the same user (ptrace read access to the
creator), as /dev/shm needed its file mode.

Leak checks look at what live processes hold: `held_segments()` lists every segment some process
still has open or mapped (memory not freed), `orphaned_segments()` those whose creator has ended
(a peer still mapping them), `list_segments()` the ones this process created and still offers.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
import weakref
from pathlib import Path

import numpy as np
import torch

PREFIX = "triptych-"
_NAME = rf"{PREFIX}[0-9a-f]{{32}}-p(\d+)-[a-z0-9_]+"  # a segment's name; group: the creator's pid
_HANDLE = re.compile(rf"^({_NAME})-fd(\d+)$")  # name, pid, the creator's fd
_MEMFD = re.compile(rf"/memfd:({_NAME}) \(deleted\)")  # how /proc shows one: name, pid
_CREATOR = re.compile(rf"^{_NAME}")  # a name or a handle: pid
PROC = Path("/proc")
_OWNED: weakref.WeakSet[Segment] = weakref.WeakSet()  # created here (list_segments)


class SegmentGone(FileNotFoundError):
    """The segment's creator let go of it (or ended): it can no longer be attached."""


def _map(fd: int, nbytes: int) -> mmap.mmap:
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # pre-fault: no first-touch stalls
    return mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class Segment:
    """One mapped segment. The creator (`owner`) holds its descriptor until unlink()."""

    def __init__(self, name: str, buf: mmap.mmap, fd: int | None) -> None:
        self.name, self.buf, self._fd = name, buf, fd
        self.nbytes = len(buf)

    def __del__(self) -> None:
        self.unlink()  # a creator that forgot: its tensors keep the mapping, not the descriptor

    @property
    def owner(self) -> bool:
        """The creator, still holding the descriptor others attach through."""
        return self._fd is not None

    @classmethod
    def create(cls, kind: str, nbytes: int) -> Segment:
        base = f"{PREFIX}{uuid.uuid4().hex}-p{os.getpid()}-{kind}"
        fd = os.memfd_create(base, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            seg = cls(f"{base}-fd{fd}", _map(fd, max(nbytes, 1)), fd)
            _OWNED.add(seg)
            return seg
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, name: str) -> Segment:
        m = _HANDLE.match(name)
        if not m:
            raise ValueError(f"not a triptych segment handle: {name!r}")
        base, pid, fd_no = m.group(1), int(m.group(2)), int(m.group(3))
        try:
            fd = os.open(PROC / str(pid) / "fd" / str(fd_no), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SegmentGone(f"shared-memory segment {base} is gone (its creator, process {pid}, let go of it)")
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != f"/memfd:{base} (deleted)":
                raise SegmentGone(f"shared-memory segment {base} is gone (process {pid} let go of it)")
            return cls(name, _map(fd, os.fstat(fd).st_size), None)
        finally:
            os.close(fd)  # the mapping keeps the memory

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
        """A tensor viewing bytes [offset, offset + numel*itemsize) of the segment."""
        count = int(np.prod(shape, dtype=np.int64))
        return torch.frombuffer(self.buf, dtype=dtype, count=count, offset=offset).view(shape)

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def unlink(self) -> None:
        """Let go of the descriptor (creator only, idempotent): no one can attach any more; live
        mappings keep the memory until their last view is freed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def creator_pid(name: str) -> int | None:
    """The pid that created the segment of this handle or name (None: neither)."""
    m = _CREATOR.match(name)
    return int(m.group(1)) if m else None


def _held_by(pid: str) -> set[str]:
    """The segments process `pid` holds open (descriptors) or mapped; empty if it is gone."""
    held: set[str] = set()
    try:
        fds = list((PROC / pid / "fd").iterdir())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return held
    for fd in fds:
        try:
            m = _MEMFD.fullmatch(os.readlink(fd))
        except OSError:
            continue
        if m:
            held.add(m.group(1))
    try:
        with open(PROC / pid / "maps") as f:
            held.update(m.group(1) for line in f if (m := _MEMFD.search(line)))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return held


def held_segments(pid: int | None = None) -> list[str]:
    """The segments that process `pid` (default: any live process on this host) still holds open
    or mapped, i.e. whose memory is not freed, by name `triptych-<uuid>-p<creator pid>-<kind>`."""
    if pid is not None:
        return sorted(_held_by(str(pid)))
    held: set[str] = set()
    for p in PROC.iterdir():
        if p.name.isdigit():
            held |= _held_by(p.name)
    return sorted(held)


def list_segments() -> list[str]:
    """Handles of the segments this process created and has not let go of (attachable)."""
    return sorted(seg.name for seg in list(_OWNED) if seg.owner)


def orphaned_segments() -> list[str]:
    """Segments still held by some process although their creator has ended: memory a live
    process keeps for a peer that is gone (a sender still mapping a dead receiver's cache)."""
    return [n for n in held_segments() if not pid_alive(creator_pid(n) or 0)]


def pid_alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie, exited but not yet reaped, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
