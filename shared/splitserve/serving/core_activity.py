"""Which cores have an engine with work right now: a small shared file the engine workers of one machine write and
read, so that a worker borrows a neighbour's cores exactly while the neighbour has nothing to run.

Why not /proc/stat alone: its counters tick at 100 Hz, so a share over a short window is coarse, and a worker that
steps rarely (a prefill worker at concurrency 1) has no recent sample: its window reached back over the decode of
the previous request, so the decode worker, idle for the last few milliseconds, read as busy and 7 of 8 prompts at
c=1 ran on one core. An engine knows when it runs out of work; it says so here.

One 8-byte slot per core id holding its state (0 never written, 1 busy, 2 idle); a reader that races a write
sees the old or the new state, either of which is true within a step.
"""

from __future__ import annotations

import mmap
import os
import struct
from enum import IntEnum
from typing import Optional, Sequence

_SLOT = struct.Struct("<q")
MAX_CORES = 4096


class CoreState(IntEnum):
    UNKNOWN = 0                    # no engine has written the slot: nothing says what runs there
    BUSY = 1
    IDLE = 2


class CoreActivityBoard:
    """The shared file, mapped. Each worker marks its own (home) cores; any worker reads any core."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = MAX_CORES * _SLOT.size
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)     # zeros: every slot UNKNOWN (a later opener finds the size and keeps it)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def mark(self, cores: Sequence[int], state: CoreState) -> None:
        for core in cores:
            _SLOT.pack_into(self._map, _offset(core), int(state))

    def state(self, core: int) -> CoreState:
        value = _SLOT.unpack_from(self._map, _offset(core))[0]
        return CoreState(value) if value in (CoreState.BUSY, CoreState.IDLE) else CoreState.UNKNOWN

    def states(self, cores: Sequence[int]) -> Optional[CoreState]:
        """BUSY if any of the cores is busy, IDLE if all are idle, None (unknown) otherwise."""
        seen = {self.state(core) for core in cores}
        if CoreState.BUSY in seen:
            return CoreState.BUSY
        if seen == {CoreState.IDLE}:
            return CoreState.IDLE
        return None


def _offset(core: int) -> int:
    if not 0 <= core < MAX_CORES:
        raise ValueError(f"core id {core} outside 0..{MAX_CORES - 1}")
    return core * _SLOT.size
