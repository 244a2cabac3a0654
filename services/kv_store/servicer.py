"""The KVStore gRPC service: translates RPCs into BlockStore calls and the store's typed errors into statuses.

Reserve/Pin hand out each slot's (address, rkey) when the UCX data plane serves; engines move the bytes
themselves and Commit/Release. PutBlocks writes each block through a one-block reservation held only while its
pieces arrive, so a stream that breaks mid-block leaves nothing visible. GetBlocks pins its leading run for the
stream's life, so nothing it sends can be evicted (and its slot overwritten) under it. With `verify_checksums`
every block is hashed on its way in (in a worker thread, off the loop): a block whose bytes do not match its
writer's checksum never becomes visible, and blocks that came without one get one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator, Optional

import grpc

from splitserve.kv_blocks.checksum import crc32
from splitserve.kv_transfer import PIECE_BYTES, REQUEST_ID_METADATA_KEY
from splitserve.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.errors import PARAM_METADATA_KEY, abort_invalid
from splitserve.services.kv_store import metrics
from splitserve.services.kv_store.block_layout import LayoutConflictError, check_payload_size
from splitserve.services.kv_store.block_store import BlockStore, StoreFullError, leading_run
from splitserve.services.kv_store.leases import UNTIL_RELEASED, UnknownLeaseError

log = logging.getLogger(__name__)

MAX_PIECE_BYTES = 16 << 20  # a client may ask for bigger pieces than the default, not for unbounded messages
DRAIN_POLL_S = 0.05
GRPC_ENDPOINT = kv_store_pb2.DataPlaneEndpoint(transport="grpc")


class ChecksumError(InvalidRequestError):
    """Written bytes do not match the checksum their writer computed: a torn or misdirected write."""

    def __init__(self, message: str):
        super().__init__(message, "block_crc32")


@dataclass
class _IncomingBlock:
    block_hash: bytes
    layout: common_pb2.KVLayout
    reservation_id: str
    already_present: bool
    crc32: Optional[int]
    received: int = 0


class KVStoreServicer(kv_store_pb2_grpc.KVStoreServicer):
    def __init__(self, store: BlockStore, is_draining: Callable[[], bool],
                 endpoint: kv_store_pb2.DataPlaneEndpoint = GRPC_ENDPOINT, verify_checksums: bool = False):
        self.store = store
        self.is_draining = is_draining
        self.endpoint = endpoint
        self.verify_checksums = verify_checksums
        self._transfers = _RunningTransfers()
        # Reservations and pins handed out by Reserve/Pin (the UCX data plane: the client moves the bytes):
        # id -> "in" or "out". Ended by Commit/Release, or by expiry.
        self._open_leases: dict[str, str] = {}

    async def drain(self) -> None:
        """Waits for running PutBlocks/GetBlocks streams and for UCX transfers between Reserve/Pin and their
        Commit/Release (or lease expiry); new puts are already refused by then."""
        if self._transfers.count:
            log.info("waiting for %d block transfers to finish", self._transfers.count)
        await self._transfers.wait_idle()
        logged = False
        while True:
            self._open_leases = {lease: way for lease, way in self._open_leases.items() if self.store.holds(lease)}
            if not self._open_leases:
                return
            if not logged:
                log.info("waiting for %d UCX transfers to commit or release", len(self._open_leases))
                logged = True
            await asyncio.sleep(DRAIN_POLL_S)

    # ---- control plane -------------------------------------------------------------------------------------

    async def Reserve(self, request, context):
        await self._refuse_if_draining(context)
        try:
            reservation = self.store.reserve(request.layout, list(request.block_hashes.hashes),
                                             _lease_s(request.lease_ms), request.request_id)
        except Exception as exc:
            await _abort(context, exc)
        self._open_leases[reservation.reservation_id] = "in"
        response = kv_store_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id, endpoint=self.endpoint, block_bytes=reservation.block_bytes,
            already_present=reservation.already_present)
        if self._serves_ucx:
            fill_slot_addresses(response.slots, reservation.addresses, reservation.rkey)
        return response

    async def Commit(self, request, context):
        hashes = list(request.block_hashes.hashes)
        crc32s = list(request.block_crc32) or None
        try:
            if self.verify_checksums:
                crc32s = await self._verified_checksums(request.reservation_id, hashes, crc32s)
            committed = self.store.commit(request.reservation_id, hashes, crc32s)
            if self._open_leases.pop(request.reservation_id, None):
                metrics.UCX_BLOCKS.labels("in").inc(committed)
        except ChecksumError as exc:
            self.store.release(request.reservation_id)  # nothing of a torn write becomes visible
            metrics.CHECKSUM_FAILURES.inc()
            log.warning("Commit of reservation %s refused: %s", request.reservation_id, exc)
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        except Exception as exc:
            await _abort(context, exc)
        return kv_store_pb2.CommitResponse(committed_blocks=committed)

    async def Lookup(self, request, context):
        try:
            present = self.store.lookup(request.layout, list(request.block_hashes.hashes))
        except Exception as exc:
            await _abort(context, exc)
        return kv_store_pb2.LookupResponse(present=present, prefix_blocks=leading_run(present))

    async def Pin(self, request, context):
        try:
            pin = self.store.pin(request.layout, list(request.block_hashes.hashes), _lease_s(request.lease_ms),
                                 request.request_id, leading_run=request.leading_run)
        except Exception as exc:
            await _abort(context, exc)
        self._open_leases[pin.pin_id] = "out"
        crc32, has_crc32 = checksum_fields(pin.crc32s)
        response = kv_store_pb2.PinResponse(pin_id=pin.pin_id, pinned=pin.pinned, endpoint=self.endpoint,
                                            block_bytes=pin.block_bytes, crc32=crc32, has_crc32=has_crc32)
        if self._serves_ucx:
            fill_slot_addresses(response.locations, pin.addresses, pin.rkey)
        return response

    async def Release(self, request, context):
        released = self.store.release(request.pin_id)
        if self._open_leases.pop(request.pin_id, None) == "out":
            metrics.UCX_BLOCKS.labels("out").inc(released)
        return kv_store_pb2.ReleaseResponse(released_blocks=released)

    async def Discard(self, request, context):
        hashes = list(request.block_hashes.hashes)
        try:
            discarded = self.store.discard(request.layout, hashes)
        except Exception as exc:
            await _abort(context, exc)
        metrics.DISCARDED_BLOCKS.inc(discarded)
        log.warning("request %r: a reader found %d blocks corrupt (first %s); %d of them held here are dropped, so "
                    "the next writer replaces them", request.request_id, len(hashes),
                    hashes[0].hex() if hashes else "-", discarded)
        return kv_store_pb2.DiscardResponse(discarded_blocks=discarded)

    async def Stats(self, request, context):
        self.store.expire()
        return self.store.stats()

    # ---- data plane ----------------------------------------------------------------------------------------

    async def PutBlocks(self, request_iterator, context):
        request_id = _request_id(context)
        stored = already_present = 0
        incoming: Optional[_IncomingBlock] = None
        with self._transfers.track("in") as transfer:
            if self.is_draining():
                # Read the client's stream to its end before refusing: aborting while it still writes makes
                # gRPC report a bare INTERNAL error to the client instead of this status and message.
                async for _ in request_iterator:
                    pass
                await self._refuse_if_draining(context)
            try:
                async for chunk in request_iterator:
                    if incoming is None:
                        incoming = self._begin_block(chunk, request_id)
                    elif chunk.block_hash != incoming.block_hash or chunk.offset != incoming.received:
                        raise InvalidRequestError(
                            f"piece of block {chunk.block_hash.hex()} at offset {chunk.offset} arrived while block "
                            f"{incoming.block_hash.hex()} expected offset {incoming.received}", "block_hashes")
                    if not incoming.already_present:
                        self.store.write(incoming.reservation_id, incoming.block_hash, chunk.offset, chunk.data)
                    incoming.received += len(chunk.data)
                    transfer.nbytes += len(chunk.data)
                    if chunk.last:
                        check_payload_size(incoming.layout, incoming.block_hash, incoming.received)
                        if incoming.already_present:
                            self.store.release(incoming.reservation_id)
                            already_present += 1
                        else:
                            crc32s = [incoming.crc32] if incoming.crc32 is not None else None
                            if self.verify_checksums:
                                crc32s = await self._verified_checksums(incoming.reservation_id,
                                                                        [incoming.block_hash], crc32s)
                            self.store.commit(incoming.reservation_id, [incoming.block_hash], crc32s)
                            stored += 1
                        incoming = None
                if incoming is not None:
                    raise InvalidRequestError(f"stream ended inside block {incoming.block_hash.hex()} after "
                                              f"{incoming.received} bytes", "block_hashes")
            except Exception as exc:
                log.warning("PutBlocks (request %r) failed after %d stored blocks: %s", request_id, stored, exc)
                if isinstance(exc, ChecksumError):
                    metrics.CHECKSUM_FAILURES.inc()
                    await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
                await _abort(context, exc)
            finally:
                if incoming is not None:  # torn or refused mid-block: its slot goes back, nothing becomes visible
                    self.store.release(incoming.reservation_id)
            transfer.ok = True
        return kv_store_pb2.PutBlocksResponse(stored_blocks=stored, already_present_blocks=already_present)

    async def GetBlocks(self, request, context) -> AsyncIterator[kv_store_pb2.BlockChunk]:
        hashes = list(request.block_hashes.hashes)
        request_id = _request_id(context)
        piece = min(request.max_chunk_bytes or PIECE_BYTES, MAX_PIECE_BYTES)
        with self._transfers.track("out") as transfer:
            try:
                pin = self.store.pin(request.layout, hashes, UNTIL_RELEASED, request_id, leading_run=True)
            except Exception as exc:
                log.warning("GetBlocks (request %r) refused: %s", request_id, exc)
                await _abort(context, exc)
            try:
                payloads = self.store.pinned_payloads(pin.pin_id)
                for block_hash, payload, checksum in zip(hashes, payloads, pin.crc32s):
                    for offset in range(0, len(payload), piece):
                        data = bytes(payload[offset:offset + piece])
                        chunk = kv_store_pb2.BlockChunk(block_hash=block_hash, offset=offset, data=data,
                                                        last=offset + piece >= len(payload))
                        if offset == 0:
                            chunk.layout.CopyFrom(request.layout)
                            if checksum is not None:
                                chunk.crc32 = checksum
                        yield chunk
                        transfer.nbytes += len(data)
                if len(payloads) < len(hashes):
                    yield kv_store_pb2.BlockChunk(block_hash=hashes[len(payloads)], missing=True)
                transfer.ok = True
            finally:
                self.store.release(pin.pin_id)

    # ---- helpers -------------------------------------------------------------------------------------------

    @property
    def _serves_ucx(self) -> bool:
        return self.endpoint.transport == "ucx"

    async def _verified_checksums(self, reservation_id: str, hashes: list[bytes],
                                  claimed: Optional[list[int]]) -> list[Optional[int]]:
        """Hashes the reserved slots (off the loop); raises ChecksumError where they differ from `claimed`.

        Returns the checksums to keep: the claimed ones, or the computed ones when the writer sent none.
        """
        if claimed is not None and len(claimed) != len(hashes):
            raise InvalidRequestError(f"{len(claimed)} checksums for {len(hashes)} blocks", "block_crc32")
        payloads = self.store.reserved_payloads(reservation_id, hashes)
        computed = await asyncio.to_thread(lambda: [None if p is None else crc32(p) for p in payloads])
        kept = []
        for i, (block_hash, got) in enumerate(zip(hashes, computed)):
            want = claimed[i] if claimed is not None else got
            if got is not None and got != want:
                raise ChecksumError(f"block {block_hash.hex()} arrived torn: crc32 {got:08x} of the written bytes, "
                                    f"{want:08x} computed by the writer")
            kept.append(want)
        return kept

    def _begin_block(self, chunk: kv_store_pb2.BlockChunk, request_id: str) -> _IncomingBlock:
        if chunk.offset != 0 or not chunk.HasField("layout"):
            raise InvalidRequestError(f"block {chunk.block_hash.hex()} must start with a piece at offset 0 "
                                      f"carrying its layout", "layout")
        reservation = self.store.reserve(chunk.layout, [chunk.block_hash], UNTIL_RELEASED, request_id)
        return _IncomingBlock(chunk.block_hash, chunk.layout, reservation.reservation_id,
                              reservation.already_present[0], chunk.crc32 if chunk.HasField("crc32") else None)

    async def _refuse_if_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self.is_draining():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kv-store is draining: it takes no new blocks")


@dataclass
class _Transfer:
    nbytes: int = 0
    ok: bool = False


class _RunningTransfers:
    """PutBlocks/GetBlocks streams in flight: counted in the transfer metrics and awaited by the drain."""

    def __init__(self):
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def track(self, direction: str) -> Iterator[_Transfer]:
        transfer = _Transfer()
        started = time.perf_counter()
        self.count += 1
        self._idle.clear()
        try:
            yield transfer
        finally:
            metrics.TRANSFER_BYTES.labels(direction=direction).inc(transfer.nbytes)
            metrics.TRANSFER_SECONDS.labels(direction=direction).inc(time.perf_counter() - started)
            if not transfer.ok:
                metrics.TRANSFER_FAILURES.labels(direction=direction).inc()
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def _lease_s(lease_ms: int) -> Optional[float]:
    return lease_ms / 1000 if lease_ms else None


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY:
            return value
    return ""


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """Ends the call with the status that names what went wrong; re-raises anything the store does not throw."""
    if isinstance(exc, LayoutConflictError):
        context.set_trailing_metadata(((PARAM_METADATA_KEY, exc.param),))
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, InvalidRequestError):
        await abort_invalid(context, exc)
    if isinstance(exc, StoreFullError):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, UnknownLeaseError):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
    raise exc


def fill_slot_addresses(slots: kv_store_pb2.SlotAddresses, addresses: list[int], rkey: bytes) -> None:
    """Sets a response's SlotAddresses from slot addresses (0: no slot), in place: a SlotAddresses built apart
    and passed to the response's constructor is copied, which costs as much again for 2000 blocks. One rkey
    opens them all: a call's blocks share a layout, hence a block size and a slab."""
    slots.SetInParent()
    slots.remote_addrs.extend(addresses)
    slots.rkey_index.extend([0] * len(addresses))
    if any(addresses):
        slots.rkeys.append(rkey)


def checksum_fields(crc32s: list[Optional[int]]) -> tuple[list[int], list[bool]]:
    """PinResponse's parallel `crc32` and `has_crc32` for checksums that may be missing (None)."""
    if crc32s.count(None) == len(crc32s):
        return [0] * len(crc32s), [False] * len(crc32s)
    return [0 if c is None else c for c in crc32s], [c is not None for c in crc32s]
