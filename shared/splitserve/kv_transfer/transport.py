"""The data-plane interface prefill and decode use to move KV blocks to and from a kv-store.

Blocks travel as rows of a uint8 tensor `[num_blocks, block_bytes]`, each row one block's payload in the
engine's byte order (see block_io.py). Implementations: ucx_transport.py (the default: UCX, gRPC for control)
and grpc_transport.py (gRPC streams: the `tcp` fallback).
Every call carries the KV layout and the store refuses blocks under another layout, so a mismatch is an error
here, never garbage in a cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Iterator, Optional, Protocol, Union

import torch

from splitserve.v1 import common_pb2


class KVTransferError(RuntimeError):
    """A transfer failed (store unreachable, torn stream, deadline); callers fall back to recompute."""


class KVLayoutMismatchError(KVTransferError):
    """The store or the peer holds another KV layout; the message names both."""


class KVChecksumError(KVTransferError):
    """A received block does not match its writer's checksum; the store was asked to drop it (Discard)."""


class LentRows(Protocol):
    """Rows still in an engine's KV cache (block_io.CacheBlocks): copied to where they go, then released."""
    shape: tuple[int, int]

    def rows(self) -> torch.Tensor: ...

    def copy_rows_to(self, first: int, count: int, out: torch.Tensor) -> None: ...

    def row_crc32s(self) -> list[int]: ...


PutRows = Union[torch.Tensor, LentRows]


class ReceivedBlocks:
    """What a get found, for the caller to copy into its KV cache: `count` leading rows as runs of
    (first row, uint8 view `[k, block_bytes]`).

    Staged rows are the caller's own memory. Mapped rows are the store's memory itself (no copy in between),
    readable only while the store's pin holds: copy them inside `reading()` and trust the copy only if
    `in_time()` is still true after it. The transport ends the pin once the rows were read (or `abandon()` was
    called, or the pin ran out); a reader that comes after that gets a KVTransferError, never freed memory.
    """

    def __init__(self, count: int, runs: list[tuple[int, torch.Tensor]], valid_until: float = math.inf,
                 mapped: bool = False):
        self.count = count
        self.mapped = mapped
        self._runs = runs
        self._valid_until = valid_until
        self._lock = threading.Lock()
        self._readers = 0
        self._closed = False
        self._idle = threading.Condition(self._lock)
        # Set from whichever thread reads (the engine's), waited on by the transport's event loop.
        try:
            self._loop: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
            self._read_or_abandoned: Optional[asyncio.Event] = asyncio.Event()
        except RuntimeError:  # made outside a loop: nobody waits for it
            self._loop = self._read_or_abandoned = None

    @classmethod
    def staged(cls, rows: torch.Tensor) -> "ReceivedBlocks":
        return cls(rows.shape[0], [(0, rows)] if rows.shape[0] else [])

    @property
    def nbytes(self) -> int:
        return sum(view.numel() for _, view in self._runs)

    @contextlib.contextmanager
    def reading(self) -> Iterator[list[tuple[int, torch.Tensor]]]:
        with self._lock:
            if self._closed:
                raise KVTransferError("received KV blocks were given back before they were read")
            self._readers += 1
        try:
            yield self._runs
        finally:
            with self._lock:
                self._readers -= 1
                self._idle.notify_all()
            self._signal()

    def in_time(self) -> bool:
        """Whether the store's pin still holds, i.e. whatever was copied out so far is what the writer wrote."""
        return time.monotonic() < self._valid_until

    def rows(self) -> torch.Tensor:
        """All rows as one tensor (a copy when they came in several runs)."""
        with self.reading() as runs:
            if len(runs) == 1:
                return runs[0][1] if not self.mapped else runs[0][1].clone()
            if not runs:
                return torch.empty((0, 0), dtype=torch.uint8)
            return torch.cat([view for _, view in runs])

    def abandon(self) -> None:
        """Nobody will read these rows (the request ended first): let the pin go now."""
        self._signal()

    async def wait_read(self) -> None:
        """Returns once the rows were read, abandoned, or the pin ran out (on the loop that made this)."""
        timeout = self._valid_until - time.monotonic()
        if timeout > 0 and self._read_or_abandoned is not None:
            try:
                await asyncio.wait_for(self._read_or_abandoned.wait(), min(timeout, 3600.0))
            except asyncio.TimeoutError:
                pass

    def _signal(self) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._read_or_abandoned.set)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def close(self) -> None:
        """No more readers: waits for one in progress (a bounded copy), then the views are dropped."""
        with self._lock:
            self._closed = True
            while self._readers:
                self._idle.wait()
            self._runs = []


class KVTransport(Protocol):
    name: str

    async def put_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         blocks: PutRows, request_id: str = "", timeout_s: float = 30.0) -> int:
        """Stores row i of `blocks` under `hashes[i]`; returns how many the store now holds of them (new or
        present). Lent cache blocks are read in place; the caller releases them after this returns."""
        ...

    async def get_blocks_in_place(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                                  request_id: str = "", timeout_s: float = 30.0) -> ReceivedBlocks:
        """The longest leading run of `hashes` the store holds, readable where it lies when the transport can
        map the store's memory (else staged). The caller copies them into its cache or calls abandon()."""
        ...

    async def get_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         request_id: str = "", timeout_s: float = 30.0,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The payloads of the longest leading run of `hashes` the store holds, as `[k, block_bytes]` (k may be 0).

        `out` (uint8 CPU, contiguous, at least `[len(hashes), block_bytes]`): receive into it (a caller's reusable
        staging buffer, whose pages are already faulted in) and return a view of its first k rows.
        """
        ...

    async def close(self) -> None:
        ...
