"""Host-RAM memory for blocks of one payload size: a slab of fixed-size slots in one anonymous mapping.

One mapping per block size (not a bytes object per block) because a UCX data plane will register the whole
buffer once and hand out (remote_addr, rkey) per slot. The OS commits a page only when it is first written, so
mapping a capacity's worth of slots costs address space, not RAM; freed slots are reused before fresh ones, so
resident memory follows the most blocks ever held, not the mapping's size.
"""

from __future__ import annotations

import mmap


class SlotPoolExhaustedError(RuntimeError):
    """More slots taken than the pool has; the store's byte accounting should make this impossible."""


class SlotPool:
    def __init__(self, slot_bytes: int, num_slots: int):
        if slot_bytes < 1 or num_slots < 1:
            raise ValueError(f"a slot pool needs slot_bytes >= 1 and num_slots >= 1, got {slot_bytes}, {num_slots}")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self._buffer = mmap.mmap(-1, slot_bytes * num_slots)
        self._memory = memoryview(self._buffer)
        self._freed: list[int] = []  # reused first: their pages are already resident
        self._next_fresh = 0  # slots from here on were never handed out

    @property
    def num_used(self) -> int:
        return self._next_fresh - len(self._freed)

    def allocate(self) -> int:
        if self._freed:
            return self._freed.pop()
        if self._next_fresh == self.num_slots:
            raise SlotPoolExhaustedError(f"all {self.num_slots} slots of {self.slot_bytes} bytes are in use")
        self._next_fresh += 1
        return self._next_fresh - 1

    def free(self, slot: int) -> None:
        self._freed.append(slot)

    def view(self, slot: int) -> memoryview:
        """The slot's bytes, writable, without a copy; valid until the slot is freed and taken again."""
        start = slot * self.slot_bytes
        return self._memory[start:start + self.slot_bytes]
