"""The data-plane interface prefill and decode use to move KV blocks to and from a kv-store.

Blocks travel as rows of a uint8 tensor `[num_blocks, block_bytes]`, each row one block's payload in the
engine's byte order (see engine/block_io.py). Implementations: ucx_transport.py (the default: UCX, gRPC for control)
and grpc_transport.py (gRPC streams: the `tcp` fallback).
Every call carries the KV layout and the store refuses blocks under another layout, so a mismatch is an error
here, never garbage in a cache.
"""

from __future__ import annotations

import math
import threading
import time
from typing import AsyncContextManager, Callable, Optional, Protocol, Union

import torch

from splitserve.engine.kv_connector import KVLoadError
from splitserve.kv_transfer.metrics import KV_TRANSFER_FAILURES, KV_TRANSFER_SECONDS
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

    def rows(self, out: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def copy_rows_to(self, first: int, count: int, out: torch.Tensor) -> None: ...

    def row_crc32s(self) -> list[int]: ...


PutRows = Union[torch.Tensor, LentRows]


class ReceivedBlocks:
    """What a get found, as the engine's ReceivedKV (engine/kv_connector.py): `count` leading rows as runs of
    (first row, uint8 view `[k, block_bytes]`).

    Staged rows are the receiver's own memory. Mapped rows are the store's memory itself, readable only while
    the store's pin holds: the transport that pinned them closes this object before it ends the pin (a read in
    progress finishes first), and a read that ends after the pin's deadline is reported as untrustworthy.
    Either way the reader gets KVLoadError, never freed or reused memory taken for KV.
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

    @classmethod
    def staged(cls, rows: torch.Tensor) -> "ReceivedBlocks":
        return cls(rows.shape[0], [(0, rows)] if rows.shape[0] else [])

    @property
    def nbytes(self) -> int:
        return sum(view.numel() for _, view in self._runs)

    def read(self, write: Callable[[list[tuple[int, torch.Tensor]]], None]) -> None:
        """Calls `write(runs)` while the rows are readable (from any thread); raises KVLoadError, counted, when
        the rows were given back first or the copy ended after the pin could have run out."""
        with self._lock:
            if self._closed:
                _unusable()
                raise KVLoadError("received KV blocks were given back before they were read")
            if not self.in_time():  # nothing copied now could be trusted: do not copy
                _unusable()
                raise KVLoadError("the kv-store's pin on the blocks ran out before they were read")
            self._readers += 1
        started = time.monotonic()
        try:
            write(self._runs)
        finally:
            with self._lock:
                self._readers -= 1
                self._idle.notify_all()
        if self.mapped:  # this copy is the transfer's data movement: the transport timed only its RPCs
            KV_TRANSFER_SECONDS.labels("get").inc(time.monotonic() - started)
        if not self.in_time():
            _unusable()
            raise KVLoadError("the kv-store's pin on the blocks ran out before they were copied")

    def seconds_left(self) -> float:
        """How long the rows stay readable (math.inf when staged: this process's own memory)."""
        return max(0.0, self._valid_until - time.monotonic())

    def in_time(self) -> bool:
        """Whether the store's pin still holds, i.e. whatever was copied out so far is what the writer wrote."""
        return time.monotonic() < self._valid_until

    def rows(self) -> torch.Tensor:
        """All rows as one tensor of this process's memory (a copy when mapped or in several runs)."""
        copied: list[torch.Tensor] = []
        self.read(lambda runs: copied.extend(view.clone() if self.mapped else view for _, view in runs))
        if len(copied) == 1:
            return copied[0]
        return torch.cat(copied) if copied else torch.empty((0, 0), dtype=torch.uint8)

    def close(self) -> None:
        """No more readers: waits for one in progress (a bounded copy), then the views are dropped."""
        with self._lock:
            self._closed = True
            while self._readers:
                self._idle.wait()
            self._runs = []


def _unusable() -> None:
    KV_TRANSFER_FAILURES.labels("get", "received_rows_unusable").inc()


class KVTransport(Protocol):
    name: str

    async def put_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         blocks: PutRows, request_id: str = "", timeout_s: float = 30.0) -> int:
        """Stores row i of `blocks` under `hashes[i]`; returns how many the store now holds of them (new or
        present). Lent cache blocks are read in place; the caller releases them after this returns."""
        ...

    def pinned_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                      request_id: str = "", timeout_s: float = 30.0) -> AsyncContextManager[ReceivedBlocks]:
        """`async with`: the longest leading run of `hashes` the store holds, readable where it lies when the
        transport can map the store's memory (else staged), until the body ends. The transport acquires the
        pin, bounds it by the deadline and ends it, all in this one place."""
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
