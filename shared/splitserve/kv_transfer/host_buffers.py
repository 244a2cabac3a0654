"""Host memory for received KV blocks: faulted in up front on huge pages, and recycled once nobody uses it.

Copying into never-touched memory pays one page fault per 4 KiB, and on the VMs measured (docs/kv-transport.md)
that fault, not the copy, sets the pace: memcpy into a fresh torch.empty ran at 0.5 GB/s against 8-11 GB/s
into touched memory. Asking for transparent huge pages and populating the range in one madvise call brought a
fresh buffer to 2.5-2.9 GB/s; reusing one that is already resident gets the full copy speed. So receive
buffers are anonymous mappings kept in a pool: a tensor handed out holds a reference to its mapping (torch
keeps the buffer alive), and a mapping whose only references are the pool's is free for the next transfer.
Small buffers come from torch's allocator, whose heap is already warm.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import mmap
import sys
import threading

import torch

log = logging.getLogger(__name__)

MIN_MAPPED_BYTES = 8 << 20  # below this the allocator's warm heap wins
HUGE_PAGE = 2 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class ReceiveBuffers:
    def __init__(self, max_idle_bytes: int = 512 << 20):
        """Keeps at most `max_idle_bytes` of mappings no tensor uses (resident memory traded for speed)."""
        self.max_idle_bytes = max_idle_bytes
        self._mappings: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._populate_works = True

    def rows(self, num_rows: int, row_bytes: int) -> torch.Tensor:
        """An uninitialized contiguous uint8 CPU tensor `[num_rows, row_bytes]`, ready to be written fast."""
        nbytes = num_rows * row_bytes
        if nbytes < MIN_MAPPED_BYTES:
            return torch.empty((num_rows, row_bytes), dtype=torch.uint8)
        mapping = self._take_idle(nbytes) or self._new_mapping(nbytes)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(num_rows, row_bytes)

    def _take_idle(self, nbytes: int):
        with self._lock:
            # Counted exactly as _idle_refcount counts: any tensor, view or numpy array over a mapping holds one
            # more reference to it (torch keeps the buffer it wraps alive).
            idle = [m for m in self._mappings if _refcount(m) <= _IDLE_REFCOUNT]
            fitting = [m for m in idle if len(m) >= nbytes]
            chosen = min(fitting, key=len) if fitting else None
            spare = sum(len(m) for m in idle if m is not chosen)
            for mapping in sorted(idle, key=len, reverse=True):  # trim the largest idle ones first
                if spare <= self.max_idle_bytes:
                    break
                if mapping is not chosen:
                    self._mappings.remove(mapping)
                    spare -= len(mapping)
                    mapping.close()
            return chosen

    def _new_mapping(self, nbytes: int) -> mmap.mmap:
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE)
        if self._populate_works:
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
            if _libc.madvise(address, size, _MADV_POPULATE_WRITE) != 0:
                self._populate_works = False  # an older kernel: pages fault in during the copy instead
                log.info("madvise(MADV_POPULATE_WRITE) failed (errno %d): received KV pages fault in one by one",
                         ctypes.get_errno())
        with self._lock:
            self._mappings.append(mapping)
        return mapping

    async def rows_async(self, num_rows: int, row_bytes: int) -> torch.Tensor:
        """rows(), with a new mapping's population (tens of ms for hundreds of MiB) kept off the event loop."""
        if num_rows * row_bytes < MIN_MAPPED_BYTES:
            return self.rows(num_rows, row_bytes)
        return await asyncio.to_thread(self.rows, num_rows, row_bytes)


def _refcount(mapping: mmap.mmap) -> int:
    return sys.getrefcount(mapping)


def _idle_refcount() -> int:
    """The reference count `_take_idle` sees for a mapping only the pool's list holds (CPython counts)."""
    pool = [mmap.mmap(-1, mmap.PAGESIZE)]
    [count] = [_refcount(m) for m in pool]
    pool[0].close()
    return count


_IDLE_REFCOUNT = _idle_refcount()


RECEIVE_BUFFERS = ReceiveBuffers()  # one per process: both transports draw from it


async def receive_buffer(num_rows: int, row_bytes: int) -> torch.Tensor:
    return await RECEIVE_BUFFERS.rows_async(num_rows, row_bytes)
