"""Host-RAM memory for blocks of one payload size: a slab of fixed-size slots in one mapping.

One slab per block size (not a bytes object per block) because the UCX data plane registers the whole slab
once and hands out (address, rkey) per slot; engines then copy blocks straight into and out of it. The slab
comes from an allocator: an anonymous private mapping by default, UCX shared memory when the UCX data plane
serves (ucx_data_plane.py). Either way the OS commits a page only when it is first written, so a capacity's
worth of slots costs address space, not RAM; freed slots are reused before fresh ones, so resident memory
follows the most blocks ever held, not the slab's size.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from typing import Callable, Iterable, Optional


class SlotPoolExhaustedError(RuntimeError):
    """More slots taken than the pool has; the store's byte accounting should make this impossible."""


@dataclass(frozen=True)
class Slab:
    """A slab's bytes, where they start in this process, and the packed UCX remote key that reaches them.

    `owner` keeps whatever backs the memory alive as long as the slab (the mapping, a UCX registration).
    """

    memory: memoryview
    address: int
    rkey: bytes = b""
    owner: object = None


SlabAllocator = Callable[[int], Slab]


def anonymous_slab(nbytes: int) -> Slab:
    """A private anonymous mapping: what the gRPC data plane needs, reachable by no other process."""
    mapping = mmap.mmap(-1, nbytes)
    return Slab(memoryview(mapping), ctypes.addressof(ctypes.c_char.from_buffer(mapping)), owner=mapping)


class SlotPool:
    def __init__(self, slot_bytes: int, num_slots: int, allocate_slab: SlabAllocator = anonymous_slab):
        if slot_bytes < 1 or num_slots < 1:
            raise ValueError(f"a slot pool needs slot_bytes >= 1 and num_slots >= 1, got {slot_bytes}, {num_slots}")
        self.slot_bytes = slot_bytes
        self.num_slots = num_slots
        self.slab = allocate_slab(slot_bytes * num_slots)
        if len(self.slab.memory) < slot_bytes * num_slots:
            raise ValueError(f"slab of {len(self.slab.memory)} bytes is smaller than {num_slots} slots of "
                             f"{slot_bytes} bytes")
        self._memory = self.slab.memory
        self._freed: list[int] = []  # reused first: their pages are already resident
        self._next_fresh = 0  # slots from here on were never handed out

    @property
    def num_used(self) -> int:
        return self._next_fresh - len(self._freed)

    def allocate(self) -> int:
        return self.allocate_many(1)[0]

    def allocate_many(self, count: int) -> list[int]:
        """`count` slots in ascending order, so a chain's blocks tend to sit side by side and move in one copy.

        The most recently freed slots first, then fresh ones; all or nothing.
        """
        reused = min(count, len(self._freed))
        fresh = count - reused
        if self._next_fresh + fresh > self.num_slots:
            raise SlotPoolExhaustedError(f"{count} slots of {self.slot_bytes} bytes asked for, "
                                         f"{self.num_slots - self.num_used} of {self.num_slots} free")
        taken = self._freed[len(self._freed) - reused:]
        del self._freed[len(self._freed) - reused:]
        taken.extend(range(self._next_fresh, self._next_fresh + fresh))
        self._next_fresh += fresh
        taken.sort()
        return taken

    def free(self, slot: int) -> None:
        self._freed.append(slot)

    def free_many(self, slots: Iterable[int]) -> None:
        self._freed.extend(slots)

    def addresses(self, slots: Iterable[Optional[int]]) -> list[int]:
        """Where each slot starts in this process, which UCX peers reach with the slab's rkey; 0 for None."""
        base, size = self.slab.address, self.slot_bytes
        return [0 if slot is None else base + slot * size for slot in slots]

    def view(self, slot: int) -> memoryview:
        """The slot's bytes, writable, without a copy; valid until the slot is freed and taken again."""
        start = slot * self.slot_bytes
        return self._memory[start:start + self.slot_bytes]
