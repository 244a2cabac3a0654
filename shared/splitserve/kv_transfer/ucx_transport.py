"""KV blocks to and from a kv-store over UCX: gRPC for control, one UCX copy per run of blocks for the bytes.

put: Reserve (slots' address + rkey) -> copy every new block in -> Commit (with checksums). get: Pin the leading
run (addresses, rkeys, checksums) -> copy out (or hand out views of the slots for the body of pinned_blocks) ->
Release in the background. A copy is trusted only if it ended while the pin surely held (the store's lease starts after
the Pin was sent, so that is known locally); an expired pin could have let a slot be reused mid-copy. No
per-block round trip: two RPCs per put, one on a get's critical path.

Leases are asked for the transfer's deadline plus a margin: a slot is written or read only while its lease
holds, even if this process stalls. Every failure, refusal or deadline is a KVTransferError (a layout problem a
KVLayoutMismatchError), and whatever was reserved or pinned is released (or left to expire if the store is
gone). A store that serves only the gRPC data plane is reached through GrpcKVTransport, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Optional, TypeVar

import grpc
import numpy as np
import torch

from splitserve.kv_blocks.checksum import ChecksumMismatchError, enabled_from_env, verify_rows
from splitserve.kv_transfer.grpc_transport import GrpcKVTransport
from splitserve.kv_transfer.host_buffers import receive_buffer
from splitserve.kv_transfer.metrics import KV_TRANSPORT_FALLBACKS, KV_UCX_BLOCKS
from splitserve.kv_transfer.store_client import (StoreChannels, block_bytes, check_out, check_rows,
                                                 check_store_block_bytes, checksum_failure, metadata, payload_crc32s,
                                                 transfer_error)
from splitserve.kv_transfer.transport import KVTransferError, PutRows, ReceivedBlocks
from splitserve.kv_transfer.ucx_copier import CopyCounts, SlotTable, UcxBlockCopier
from splitserve.v1 import common_pb2, kv_store_pb2

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 5.0  # lease = deadline + this: slots stay ours while a late copy may still touch them
RELEASE_TIMEOUT_S = 2.0  # cleanup after a failure: a dead store must not hold the caller up
_STORE_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
T = TypeVar("T")


class UcxKVTransport:
    name = "ucx"

    def __init__(self, checksum: Optional[bool] = None, ucx_config: Optional[dict[str, str]] = None):
        """`checksum` None: SPLITSERVE_KV_CHECKSUM decides. `ucx_config`: UCX options (e.g. {"TLS": "tcp"})
        over the UCX_* environment. Raises UcxUnavailableError if ucxx cannot load here."""
        self.checksum = enabled_from_env(checksum)
        self._channels = StoreChannels()
        self._copier = UcxBlockCopier(ucx_config)
        self._grpc = GrpcKVTransport(checksum=self.checksum, channels=self._channels)
        self._grpc_only_logged: set[str] = set()
        self._cleanups: set[asyncio.Task] = set()

    async def put_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         blocks: PutRows, request_id: str = "", timeout_s: float = 30.0) -> int:
        """Stores row i of `blocks` under `hashes[i]`; returns how many the store now holds of them (new or
        present). Lent cache blocks are gathered straight into the store's mapped slots."""
        size = block_bytes(store_address, layout)
        check_rows(layout, hashes, blocks, size)
        if not hashes:
            return 0
        deadline = time.monotonic() + timeout_s
        rows = blocks.detach().cpu().contiguous() if isinstance(blocks, torch.Tensor) else blocks
        crc32s = await payload_crc32s(rows) if self.checksum else None
        stub = self._channels.stub(store_address)
        reservation = await self._grant(store_address, "Reserve", stub.Reserve(
            kv_store_pb2.ReserveRequest(request_id=request_id, layout=layout, lease_ms=_lease_ms(timeout_s),
                                        block_hashes=common_pb2.BlockHashes(hashes=hashes)),
            timeout=_left(deadline), metadata=metadata(request_id)))
        copy: Optional[asyncio.Future] = None
        try:
            if reservation.endpoint.transport != "ucx":
                self._end_lease(store_address, reservation.reservation_id)
                grpc_transport = self._fallback(store_address, reservation.endpoint.transport)
                return await grpc_transport.put_blocks(store_address, layout, hashes, blocks, request_id,
                                                       _left(deadline))
            check_store_block_bytes(store_address, layout, size, reservation.block_bytes)
            present = list(reservation.already_present)
            if len(present) != len(hashes):
                raise KVTransferError(f"kv-store {store_address}: Reserve answered for {len(present)} of "
                                      f"{len(hashes)} blocks")
            slots = _slot_table(store_address, reservation.slots, len(hashes)).select(~np.array(present, dtype=bool))
            if slots:
                copy = asyncio.ensure_future(self._copier.write(store_address, reservation.endpoint.worker_address,
                                                                rows, slots, deadline))
                _count("put", await self._shielded(store_address, copy))
            committed = await self._call(store_address, "Commit", stub.Commit(
                kv_store_pb2.CommitRequest(reservation_id=reservation.reservation_id,
                                           block_hashes=common_pb2.BlockHashes(hashes=hashes), block_crc32=crc32s),
                timeout=_left(deadline), metadata=metadata(request_id)))
        except BaseException:
            self._end_lease(store_address, reservation.reservation_id, after=copy)
            raise
        return committed.committed_blocks

    async def get_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         request_id: str = "", timeout_s: float = 30.0,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The payloads of the longest leading run of `hashes` the store holds, as `[k, block_bytes]` (k may be 0).

        The result is a view of the first k rows of `out` (see KVTransport.get_blocks) or a new `[k, block_bytes]`.
        """
        size = block_bytes(store_address, layout)
        if not hashes:
            return torch.empty((0, size), dtype=torch.uint8)
        if out is not None:
            check_out(out, len(hashes), size)
        asked = time.monotonic()
        deadline = asked + timeout_s
        pin = await self._pin(store_address, layout, hashes, request_id, timeout_s, deadline)
        if pin.endpoint.transport == "ucx":
            return await self._copy_pinned(store_address, layout, hashes, pin, out, asked, timeout_s, request_id)
        self._end_lease(store_address, pin.pin_id)
        grpc_transport = self._fallback(store_address, pin.endpoint.transport)
        return await grpc_transport.get_blocks(store_address, layout, hashes, request_id, _left(deadline), out=out)

    async def _copy_pinned(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes], pin,
                           out: Optional[torch.Tensor], asked: float, timeout_s: float,
                           request_id: str) -> torch.Tensor:
        """Copies a UCX store's pinned leading run out into `out` or a receive buffer, then lets the pin go."""
        size = block_bytes(store_address, layout)
        deadline = asked + timeout_s
        found = _leading(pin.pinned)
        copy: Optional[asyncio.Future] = None
        try:
            check_store_block_bytes(store_address, layout, size, pin.block_bytes)
            # Sized after the Pin: a miss (the common case for a new prompt) allocates nothing.
            rows = check_out(out, found, size) if out is not None else await receive_buffer(found, size)
            if found:
                slots = _slot_table(store_address, pin.locations, len(hashes))[:found]
                copy = asyncio.ensure_future(self._copier.read(store_address, pin.endpoint.worker_address, rows,
                                                               slots, deadline))
                _count("get", await self._shielded(store_address, copy))
        except BaseException:
            self._end_lease(store_address, pin.pin_id, after=copy)
            raise
        # The copy is over: the Release need not be waited for, since whether the pin held throughout is known
        # here (the store's lease began after `asked`), which takes one RPC off every get.
        self._end_lease(store_address, pin.pin_id)
        if time.monotonic() >= _trusted_until(asked, timeout_s):
            raise KVTransferError(f"kv-store {store_address}: the copy of {found} blocks ended after their pin could "
                                  "have run out; it may be torn, discarded")
        if self.checksum and found:
            try:
                await asyncio.to_thread(_verify_pinned, pin, [(0, rows)], hashes)
            except ChecksumMismatchError as exc:
                raise await checksum_failure(self._channels, store_address, layout, exc, request_id) from exc
        return rows

    @contextlib.asynccontextmanager
    async def pinned_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                            request_id: str = "", timeout_s: float = 30.0) -> AsyncIterator[ReceivedBlocks]:
        """`async with`: the leading run of `hashes` the store holds, as views of the store's memory when it is
        mapped here (no copy until the reader's own, into its cache), else copied out under the same pin (staged).

        The pin's whole life is here: asked for the deadline plus the margin; trusted until the deadline plus
        half the margin, counted from before it was asked (the store's lease starts later, when it answers);
        ended when the body ends, however it ends, once a read in progress has finished. A Release that finds
        it gone is only logged, since readers check the timing themselves.
        """
        async with contextlib.AsyncExitStack() as ending:
            yield await self._pin_for_reading(ending, store_address, layout, hashes, request_id, timeout_s)

    async def _pin_for_reading(self, ending: contextlib.AsyncExitStack, store_address: str,
                               layout: common_pb2.KVLayout, hashes: list[bytes], request_id: str,
                               timeout_s: float) -> ReceivedBlocks:
        """Pins and maps (or copies) the leading run; whatever must end with the caller's body goes on `ending`."""
        size = block_bytes(store_address, layout)
        if not hashes:
            return ReceivedBlocks.staged(torch.empty((0, size), dtype=torch.uint8))
        asked = time.monotonic()
        deadline = asked + timeout_s
        pin = await self._pin(store_address, layout, hashes, request_id, timeout_s, deadline)
        found = _leading(pin.pinned)
        mapped = verify = None
        try:
            if pin.endpoint.transport != "ucx" or not found:
                self._end_lease(store_address, pin.pin_id)
                if pin.endpoint.transport != "ucx":
                    grpc_transport = self._fallback(store_address, pin.endpoint.transport)
                    return await ending.enter_async_context(grpc_transport.pinned_blocks(
                        store_address, layout, hashes, request_id, _left(deadline)))
                return ReceivedBlocks.staged(torch.empty((0, size), dtype=torch.uint8))
            check_store_block_bytes(store_address, layout, size, pin.block_bytes)
            slots = _slot_table(store_address, pin.locations, len(hashes))[:found]
            mapped = await _settled(asyncio.ensure_future(self._copier.map_for_reading(
                store_address, pin.endpoint.worker_address, slots, size, deadline)), _release_mapping)
            if mapped is not None and self.checksum:
                verify = asyncio.ensure_future(asyncio.to_thread(_verify_pinned, pin, mapped.runs, hashes))
                try:
                    await _settled(verify)
                except ChecksumMismatchError as exc:  # reported while pinned: dropped when the pin ends below
                    raise await checksum_failure(self._channels, store_address, layout, exc, request_id) from exc
        except BaseException:
            reading = verify if verify is not None and not verify.done() else None  # a check left running
            if mapped is not None:
                if reading is None:
                    mapped.release()
                else:
                    reading.add_done_callback(lambda _: mapped.release())
            self._end_lease(store_address, pin.pin_id, after=reading)
            raise
        if mapped is None:  # another host or IPC namespace: copy them out by UCX get, under the same pin
            return ReceivedBlocks.staged(await self._copy_pinned(store_address, layout, hashes, pin, None, asked,
                                                                 timeout_s, request_id))
        KV_UCX_BLOCKS.labels("get", "mapped").inc(found)
        received = ReceivedBlocks(found, mapped.runs, valid_until=_trusted_until(asked, timeout_s), mapped=True)

        async def close_then_unmap() -> None:
            await asyncio.to_thread(received.close)  # a read in progress finishes first: it reads the mapping
            mapped.release()

        ending.callback(lambda: self._end_lease(store_address, pin.pin_id,
                                                after=asyncio.ensure_future(close_then_unmap()),
                                                expected_blocks=found))
        return received

    async def _pin(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes], request_id: str,
                   timeout_s: float, deadline: float):
        """Pins the leading run of `hashes` for the deadline plus the margin."""
        stub = self._channels.stub(store_address)
        return await self._grant(store_address, "Pin", stub.Pin(
            kv_store_pb2.PinRequest(request_id=request_id, layout=layout, lease_ms=_lease_ms(timeout_s),
                                    block_hashes=common_pb2.BlockHashes(hashes=hashes), leading_run=True),
            timeout=_left(deadline), metadata=metadata(request_id)))

    async def close(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        await self._copier.close()
        await self._channels.close()

    # ---- helpers -------------------------------------------------------------------------------------------

    async def _call(self, store_address: str, method: str, call):
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            self._channels.failed(store_address, exc)
            if exc.code() in _STORE_GONE:  # let go of its endpoint and mapped memory; reconnect next time
                await self._copier.forget(store_address)
            raise transfer_error(store_address, method, exc) from exc

    async def _grant(self, store_address: str, method: str, call):
        """A Reserve or Pin: its lease is this transport's to end from the moment the store grants it, even if
        the caller stops waiting (a client that disconnected mid-request) while the RPC is in flight: the store
        may grant it anyway, and its id is then known only here."""
        response = asyncio.ensure_future(self._call(store_address, method, call))

        def end_granted(granted) -> None:
            self._end_lease(store_address, granted.reservation_id if method == "Reserve" else granted.pin_id)

        return await _settled(response, end_granted)

    async def _shielded(self, store_address: str, copy: asyncio.Future) -> CopyCounts:
        """Awaits a copy without cancelling it: a copy stops only at its deadline (it may be touching slots)."""
        try:
            return await _settled(copy)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise KVTransferError(f"kv-store {store_address}: UCX copy failed: {exc}") from exc

    async def _release(self, store_address: str, lease_id: str):
        stub = self._channels.stub(store_address)
        return await self._call(store_address, "Release", stub.Release(
            kv_store_pb2.ReleaseRequest(pin_id=lease_id), timeout=RELEASE_TIMEOUT_S))

    def _end_lease(self, store_address: str, lease_id: str, after: Optional[asyncio.Future] = None,
                   expected_blocks: Optional[int] = None) -> None:
        """Where every pin and reservation this transport was granted ends (unless a Commit ended it): released
        in the background once `after` (a copy, a mapped read) has stopped touching its slots. Nobody waits for
        the Release: whether a lease held through a copy is known locally. A Release that fails is logged; the
        lease then expires."""

        async def end() -> None:
            if after is not None:
                await asyncio.gather(after, return_exceptions=True)
            try:
                released = await self._release(store_address, lease_id)
            except KVTransferError as exc:
                log.debug("releasing %s: %s (the lease will expire)", lease_id, exc)
                return
            if expected_blocks is not None and released.released_blocks != expected_blocks:
                log.info("kv-store %s: lease %s had ended before its release (%d of %d blocks); readers checked "
                         "their copies' timing", store_address, lease_id, released.released_blocks, expected_blocks)

        self._track(asyncio.ensure_future(end()))

    def _track(self, task: asyncio.Task) -> None:
        """Background work close() waits for (and that must not be garbage-collected half way)."""
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def _fallback(self, store_address: str, transport: str) -> GrpcKVTransport:
        """The gRPC streams, for a store that offers no UCX data plane (asked again on every transfer)."""
        KV_TRANSPORT_FALLBACKS.labels("store_without_ucx").inc()
        if store_address not in self._grpc_only_logged:
            self._grpc_only_logged.add(store_address)
            log.warning("kv-store %s serves no UCX data plane (it offers %r): moving its blocks over gRPC streams",
                        store_address, transport)
        return self._grpc


async def _settled(work: asyncio.Future, undo: Optional[Callable[[T], object]] = None) -> T:
    """Awaits `work` without cancelling it: cancelling the caller leaves it running (it may be granting a
    lease or touching mapped memory), and `undo` gets its result if it succeeds after the caller left."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        def settle(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None and undo is not None:
                undo(done.result())

        work.add_done_callback(settle)
        raise


def _release_mapping(mapped) -> None:
    if mapped is not None:
        mapped.release()


def _lease_ms(timeout_s: float) -> int:
    return int((timeout_s + LEASE_MARGIN_S) * 1000)


def _trusted_until(asked: float, timeout_s: float) -> float:
    """Until when a pin or reservation asked for at `asked` surely holds: its lease (deadline + margin) starts
    when the store answers, later than `asked`; half the margin is kept for clock drift and scheduling."""
    return asked + timeout_s + LEASE_MARGIN_S / 2


def _left(deadline: float) -> float:
    return max(0.001, deadline - time.monotonic())


def _slot_table(store_address: str, addresses: kv_store_pb2.SlotAddresses, count: int) -> SlotTable:
    """The packed arrays of a Reserve/Pin answer as a SlotTable (row i = the request's i-th hash; address 0 =
    no slot, e.g. a block already present)."""
    remote = np.array(addresses.remote_addrs, dtype=np.uint64)
    index = np.array(addresses.rkey_index, dtype=np.int64)
    rkeys = list(addresses.rkeys)
    if len(remote) != count or len(index) != count or bool(np.any((remote != 0) & (index >= len(rkeys)))):
        raise KVTransferError(f"kv-store {store_address}: malformed slot addresses ({len(remote)} addresses, "
                              f"{len(index)} key indexes, {len(rkeys)} keys for {count} blocks)")
    return SlotTable(np.arange(count, dtype=np.int64), remote, index, rkeys)


def _verify_pinned(pin, runs: list[tuple[int, torch.Tensor]], hashes: list[bytes]) -> None:
    """Checks each run of rows (first row, rows) against the checksums the Pin answered for those rows; raises
    ChecksumMismatchError."""
    known, values = list(pin.has_crc32), list(pin.crc32)
    for first, view in runs:
        count = view.shape[0]
        crc32s = [values[i] if i < len(known) and known[i] else None for i in range(first, first + count)]
        verify_rows(view, crc32s, hashes[first:first + count])


def _leading(flags) -> int:
    for i, flag in enumerate(flags):
        if not flag:
            return i
    return len(flags)


def _count(direction: str, counts: CopyCounts) -> None:
    if counts.mapped:
        KV_UCX_BLOCKS.labels(direction, "mapped").inc(counts.mapped)
    if counts.rma:
        KV_UCX_BLOCKS.labels(direction, "rma").inc(counts.rma)
