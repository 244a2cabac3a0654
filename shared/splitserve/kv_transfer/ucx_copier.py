"""Block rows to and from kv-store slots over UCX, on one thread that owns the UCP worker and its endpoints.

Each store slot arrives as (address, packed rkey) from Reserve/Pin. Per slot run (consecutive rows whose slots
are adjacent, so a chain usually moves in one copy), the remote key is asked for a local mapping of the slot:
on one host the store's slab is UCX shared memory and the run is one memcpy straight between the caller's
tensor and the slab ("mapped"); otherwise the run becomes a UCX put/get ("rma"; e.g. tcp between hosts),
completed by an endpoint flush. One endpoint per store, created from the worker address the store sends and
kept until a copy through it fails or the store's address changes (a restart). Copies drop the GIL (ctypes and
UCX calls), so the event loop serving requests keeps running while bytes move.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TypeVar, Union

import numpy as np
import torch

from splitserve.kv_transfer import ucx_rma
from splitserve.kv_transfer.transport import PutRows

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SlotRef:
    row: int  # row of the caller's tensor
    remote_addr: int
    rkey: bytes


class MappedRuns:
    """Row runs readable in place in a store's memory; `release()` (once) lets the mapping go."""

    def __init__(self, runs: list[tuple[int, torch.Tensor]], release: Callable[[], object]):
        self.runs = runs
        self._release: Optional[Callable[[], object]] = release

    def release(self) -> None:
        release, self._release = self._release, None
        self.runs = []
        if release is not None:
            release()


class SlotTable:
    """A transfer's slots as arrays, the form Reserve/Pin answers carry: row i of the caller's tensor goes to
    `remote_addrs[i]` under `rkeys[rkey_index[i]]`. Runs are found vectorised: a SlotRef per block cost ~1 us
    each, 2.4 ms for the 2000 slots of a transfer of small blocks. Indexing gives SlotRefs, slicing a table."""

    def __init__(self, rows: np.ndarray, remote_addrs: np.ndarray, rkey_index: np.ndarray, rkeys: list[bytes]):
        self.rows, self.remote_addrs, self.rkey_index, self.rkeys = rows, remote_addrs, rkey_index, rkeys

    @classmethod
    def of(cls, slots: list[SlotRef]) -> "SlotTable":
        keys = list(dict.fromkeys(slot.rkey for slot in slots))
        index = {key: i for i, key in enumerate(keys)}
        return cls(np.array([slot.row for slot in slots], dtype=np.int64),
                   np.array([slot.remote_addr for slot in slots], dtype=np.uint64),
                   np.array([index[slot.rkey] for slot in slots], dtype=np.int64), keys)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.select(item)
        return SlotRef(int(self.rows[item]), int(self.remote_addrs[item]), self.rkeys[int(self.rkey_index[item])])

    def __iter__(self) -> Iterator[SlotRef]:
        return (self[i] for i in range(len(self)))

    def select(self, which) -> "SlotTable":
        """The slots a slice, index array or boolean mask picks."""
        return SlotTable(self.rows[which], self.remote_addrs[which], self.rkey_index[which], self.rkeys)

    def runs(self, row_bytes: int) -> list[tuple[int, int, int, bytes]]:
        count = len(self.rows)
        if not count:
            return []
        starts = np.ones(count, dtype=bool)
        starts[1:] = ((self.rows[1:] != self.rows[:-1] + 1) | (self.rkey_index[1:] != self.rkey_index[:-1])
                      | (self.remote_addrs[1:] != self.remote_addrs[:-1] + np.uint64(row_bytes)))
        first = np.flatnonzero(starts)
        lengths = np.diff(np.append(first, count))
        return [(int(self.rows[f]), int(n), int(self.remote_addrs[f]), self.rkeys[int(self.rkey_index[f])])
                for f, n in zip(first, lengths)]


Slots = Union[list[SlotRef], SlotTable]


@dataclass(frozen=True)
class CopyCounts:
    mapped: int = 0  # blocks copied through a UCX mapping of the store's memory
    rma: int = 0  # blocks moved by UCX put/get


class UcxBlockCopier:
    def __init__(self, ucx_config: Optional[dict[str, str]] = None):
        """`ucx_config`: UCX options for this worker's context, e.g. {"TLS": "tcp"} (default: UCX_* env)."""
        self._ucx_config = ucx_config
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-ucx")
        self._worker: Optional[ucx_rma.ucx_api.UCXWorker] = None
        self._context = None
        self._peers: dict[str, _Peer] = {}

    async def write(self, store: str, worker_address: bytes, rows: PutRows, slots: Slots,
                    deadline: float) -> CopyCounts:
        """Copies row `s.row` of `rows` into each slot; the bytes are in the store's memory when this returns.

        `rows`: a contiguous uint8 CPU tensor, or lent cache blocks (block_io.CacheBlocks), which are gathered
        straight into mapped slots (no copy in between) and staged only for slots reached by put.
        """
        return await self._run(lambda: self._copy(store, worker_address, rows, slots, deadline, to_store=True))

    async def map_for_reading(self, store: str, worker_address: bytes, slots: Slots, row_bytes: int,
                              deadline: float) -> Optional[MappedRuns]:
        """Views of the slots' bytes in the store's memory, when every slot is mapped here (else None: read
        them with `read`). The views stay valid until the returned object's release(), even if the store fails
        in between (its endpoint is closed only after that)."""
        return await self._run(lambda: self._map(store, worker_address, slots, row_bytes, deadline))

    async def read(self, store: str, worker_address: bytes, out: torch.Tensor, slots: Slots,
                   deadline: float) -> CopyCounts:
        """Copies each slot into `out[s.row]`."""
        return await self._run(lambda: self._copy(store, worker_address, out, slots, deadline, to_store=False))

    async def forget(self, store: str) -> None:
        """Drops the endpoint to a store (it failed or went away); the next copy connects afresh."""
        await self._run(lambda: self._drop(store))

    async def close(self) -> None:
        def close_all() -> None:
            for store in list(self._peers):
                self._drop(store)
            self._worker = self._context = None

        await self._run(close_all)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn))

    # ---- on the UCX thread ---------------------------------------------------------------------------------

    def _copy(self, store: str, worker_address: bytes, tensor: PutRows, slots: Slots,
              deadline: float, to_store: bool) -> CopyCounts:
        if time.monotonic() > deadline:
            raise ucx_rma.UcxError("deadline passed before the copy started", ucx_rma.UCS_ERR_TIMED_OUT)
        if isinstance(tensor, torch.Tensor) and not (
                tensor.is_contiguous() and tensor.device.type == "cpu" and tensor.dtype == torch.uint8):
            raise ValueError("UCX copies need a contiguous uint8 CPU tensor")
        peer = self._peer(store, worker_address)
        try:
            return peer.copy(tensor, slots, deadline, to_store)
        except BaseException:
            self._drop(store)
            raise

    def _peer(self, store: str, worker_address: bytes) -> _Peer:
        peer = self._peers.get(store)
        if peer is not None and peer.worker_address != worker_address:
            log.info("kv-store %s has a new UCX worker (restarted?): reconnecting", store)
            self._drop(store)
            peer = None
        elif peer is not None and not peer.endpoint.alive:
            log.info("the UCX endpoint to kv-store %s failed earlier: reconnecting", store)
            self._drop(store)
            peer = None
        if peer is None:
            if self._worker is None:
                self._context = ucx_rma.new_context(self._ucx_config)
                self._worker = ucx_rma.ucx_api.UCXWorker(self._context)
                self._worker.init_blocking_progress_mode()
            peer = self._peers[store] = _Peer(store, self._worker, worker_address)
        ucx_rma.progress(self._worker)  # lets UCX handle keepalives and report endpoint errors
        return peer

    def _map(self, store: str, worker_address: bytes, slots: Slots, row_bytes: int,
             deadline: float) -> Optional[MappedRuns]:
        if time.monotonic() > deadline:
            raise ucx_rma.UcxError("deadline passed before mapping", ucx_rma.UCS_ERR_TIMED_OUT)
        peer = self._peer(store, worker_address)
        try:
            runs = peer.map_runs(slots, row_bytes)
        except BaseException:
            self._drop(store)
            raise
        if runs is None:
            return None
        peer.holders += 1
        return MappedRuns(runs, lambda: self._submit_unhold(peer))

    def _submit_unhold(self, peer: _Peer) -> None:
        try:
            self._executor.submit(self._unhold, peer)
        except RuntimeError:  # the copier was closed: the process is letting go of UCX anyway
            pass

    def _unhold(self, peer: _Peer) -> None:
        peer.holders -= 1
        if peer.holders == 0 and peer.dropped:
            peer.close()

    def _drop(self, store: str) -> None:
        peer = self._peers.pop(store, None)
        if peer is not None:
            peer.dropped = True
            if peer.holders == 0:  # else the last MappedRuns closes it: its views point into the mapping
                peer.close()


class _Peer:
    """One store's endpoint and the remote keys unpacked on it (one per slab)."""

    def __init__(self, store: str, worker: ucx_rma.ucx_api.UCXWorker, worker_address: bytes):
        self.store = store
        self.worker = worker
        self.worker_address = worker_address
        address = ucx_rma.ucx_api.UCXAddress.create_from_buffer(worker_address)
        # Peer error handling: a store that dies fails our operations instead of aborting this process (UCX's
        # reaction to transport errors on endpoints without it).
        self.endpoint = ucx_rma.ucx_api.UCXEndpoint.create_from_worker_address(worker, address, True)
        self._rkeys: dict[bytes, ucx_rma.RemoteKey] = {}
        self._path_logged = False
        self.holders = 0  # MappedRuns handed out and not yet released
        self.dropped = False

    def map_runs(self, slots: Slots, row_bytes: int) -> Optional[list[tuple[int, torch.Tensor]]]:
        """(first row, uint8 view `[count, row_bytes]` of the store's memory) per run, or None if any is unmapped."""
        runs = []
        for first_row, count, remote_addr, packed in _runs(slots, row_bytes):
            pointer = self._rkey(packed).local_pointer(remote_addr)
            if pointer is None:
                return None
            runs.append((first_row, _view_at(pointer, count * row_bytes).view(count, row_bytes)))
        self._log_path(len(slots), 0)
        return runs

    def copy(self, rows: PutRows, slots: Slots, deadline: float, to_store: bool) -> CopyCounts:
        row_bytes = rows.shape[1]
        tensor = rows if isinstance(rows, torch.Tensor) else None  # else lent cache blocks (only to the store)
        operations = ucx_rma.Operations(self.worker, self.endpoint)
        staged: list[torch.Tensor] = []  # rows gathered for put: alive until the puts complete
        mapped = rma = 0
        try:
            for first_row, count, remote_addr, packed in _runs(slots, row_bytes):
                if time.monotonic() > deadline:
                    raise ucx_rma.UcxError("deadline passed during the copy", ucx_rma.UCS_ERR_TIMED_OUT)
                rkey = self._rkey(packed)
                nbytes = count * row_bytes
                pointer = rkey.local_pointer(remote_addr)
                if pointer is not None and tensor is None:
                    rows.copy_rows_to(first_row, count, _view_at(pointer, nbytes).view(count, row_bytes))
                    mapped += count
                    continue
                if tensor is None:
                    staged.append(torch.empty((count, row_bytes), dtype=torch.uint8))
                    rows.copy_rows_to(first_row, count, staged[-1])
                    local = staged[-1].data_ptr()
                else:
                    local = tensor.data_ptr() + first_row * row_bytes
                if pointer is not None:
                    ctypes.memmove(pointer, local, nbytes) if to_store else ctypes.memmove(local, pointer, nbytes)
                    mapped += count
                elif to_store:
                    operations.put(local, nbytes, remote_addr, rkey)
                    rma += count
                else:
                    operations.get(local, nbytes, remote_addr, rkey)
                    rma += count
            if rma and to_store:
                operations.flush()
            operations.wait(deadline)
        finally:
            operations.cancel()
        self._log_path(mapped, rma)
        return CopyCounts(mapped, rma)

    def close(self) -> None:
        for rkey in self._rkeys.values():
            rkey.destroy()
        self._rkeys.clear()
        # close_blocking, not close: ucxx's close() crashes on an endpoint its error handler already failed
        # (measured with a SIGKILLed store); close_blocking returns for failed, live and stalled peers alike.
        try:
            self.endpoint.close_blocking()
        except Exception as exc:  # it is dropped either way
            log.debug("closing the UCX endpoint to %s: %s", self.store, exc)

    def _rkey(self, packed: bytes) -> ucx_rma.RemoteKey:
        rkey = self._rkeys.get(packed)
        if rkey is None:
            rkey = self._rkeys[packed] = ucx_rma.RemoteKey(self.endpoint, packed)
        return rkey

    def _log_path(self, mapped: int, rma: int) -> None:
        if self._path_logged or not (mapped or rma):
            return
        self._path_logged = True
        if rma:
            log.warning("kv-store %s: its slabs are not mapped into this process (another host, or no shared "
                        "memory between the two): blocks move by UCX put/get, slower than a local copy", self.store)
        else:
            log.info("kv-store %s: blocks move by direct copy through UCX-mapped shared memory", self.store)


def _runs(slots: Slots, row_bytes: int) -> list[tuple[int, int, int, bytes]]:
    """(first row, count, remote address, rkey) of each run of consecutive rows in adjacent slots of one slab."""
    table = slots if isinstance(slots, SlotTable) else SlotTable.of(slots)
    return table.runs(row_bytes)


def _view_at(pointer: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over memory this process has mapped (it does not own or free it)."""
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(pointer), dtype=torch.uint8)
