"""Per-request completion flags in a shared-memory slot table (shm and CUDA IPC transports).

The receiver creates one table; each open request holds one slot. int64 layout of a slot:

    [0] GEN    generation of the request holding the slot (receiver writes; 0 = free)
    [1] STATE  StateCode, written by the sender (PENDING is written by the receiver)
    [2] PID    sender pid, written at connect, for liveness checks
    [3] NITEMS items in the transfer
    [4 + i]    == GEN once item i (layer or payload) has landed; sender writes

Ordering: the sender writes an item's bytes, then its flag; the receiver reads the flag, then
the bytes. Aligned 8-byte stores are atomic and x86-64 keeps stores (and loads) in program order
(TSO), so a set flag implies the bytes are visible. A weakly ordered CPU would need a fence
between the copy and the flag store.

A sender checks GEN before each item: release() sets a new GEN, fencing a late sender off the
slot (it may still land the item it is copying).
"""

from __future__ import annotations

import enum

import numpy as np

from kv_transfer.base import TransferStatus
from kv_transfer.segment import Segment

GEN, STATE, PID, NITEMS, HEADER = 0, 1, 2, 3, 4


class StateCode(enum.IntEnum):
    PENDING = 0
    IN_PROGRESS = 1
    DONE = 2
    CANCELLED = 3
    FAILED = 4

    @property
    def status(self) -> TransferStatus:
        return TransferStatus[self.name]


class ControlBlock:
    def __init__(self, segment: Segment, num_slots: int, max_items: int) -> None:
        self.segment, self.num_slots, self.max_items = segment, num_slots, max_items
        self.table: np.ndarray = segment.array(np.int64, (num_slots, HEADER + max_items))

    @classmethod
    def create(cls, num_slots: int, max_items: int) -> ControlBlock:
        seg = Segment.create("ctl", num_slots * (HEADER + max_items) * 8)
        return cls(seg, num_slots, max_items)

    @classmethod
    def attach(cls, name: str, num_slots: int, max_items: int) -> ControlBlock:
        return cls(Segment.attach(name), num_slots, max_items)

    def open_slot(self, slot: int, gen: int, num_items: int) -> None:
        row = self.table[slot]
        row[GEN] = 0  # invalidate first, so no sender matches a half-written slot
        row[HEADER:] = 0
        row[STATE], row[PID], row[NITEMS] = StateCode.PENDING, 0, num_items
        row[GEN] = gen

    def close_slot(self, slot: int, fence_gen: int) -> None:
        """Give the slot a generation no sender holds (fences late senders)."""
        self.table[slot, GEN] = fence_gen

    def owns(self, slot: int, gen: int) -> bool:
        return int(self.table[slot, GEN]) == gen

    def set_state(self, slot: int, gen: int, code: StateCode) -> bool:
        if not self.owns(slot, gen):
            return False
        self.table[slot, STATE] = code
        return True

    def set_pid(self, slot: int, pid: int) -> None:
        self.table[slot, PID] = pid

    def mark_item(self, slot: int, gen: int, item: int) -> None:
        self.table[slot, HEADER + item] = gen

    def snapshot(self, slot: int, gen: int) -> tuple[StateCode, int, np.ndarray]:
        """(state, sender pid, bool mask of landed items)."""
        row = self.table[slot].copy()
        done = row[HEADER : HEADER + int(row[NITEMS])] == gen
        return StateCode(int(row[STATE])), int(row[PID]), done
