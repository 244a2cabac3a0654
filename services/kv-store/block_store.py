"""The kv-store's block pool: KV blocks in host RAM keyed by (layout, block hash), under a byte capacity.

Writers reserve slots, fill them, and commit them visible; readers pin blocks while they copy them out. Both
reservations and pins are leases that expire, so a crashed peer cannot hold memory forever. Inserting evicts
least-recently-used blocks that nobody pins. Synchronous and free of gRPC: the service calls it from one event
loop, so there are no locks, and every call costs O(blocks it names) plus the evictions it causes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from splitserve.protos.splitserve.v1 import common_pb2
from splitserve.sampling_params import InvalidRequestError
from splitserve.services.kv_store.block_layout import LayoutError, LayoutKey, block_bytes, conflict, layout_key
from splitserve.services.kv_store.leases import Lease, LeaseTable
from splitserve.services.kv_store.slot_pool import SlabAllocator, SlotPool, anonymous_slab

log = logging.getLogger(__name__)


class StoreFullError(RuntimeError):
    """Room for new blocks cannot be made because everything that could be evicted is pinned or reserved."""


@dataclass(frozen=True)
class StoreStats:
    blocks_used: int  # slots taken: stored blocks plus reserved ones
    blocks_capacity: int  # how many blocks of the largest size seen fit in the capacity
    bytes_used: int
    bytes_capacity: int
    pinned_blocks: int
    hits: int
    misses: int
    evictions: int
    expired_leases: int


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    block_bytes: int
    already_present: list[bool]  # parallel to the reserved hashes
    slots: list[Optional[tuple[int, bytes]]]  # parallel: (address, rkey) to write to; None if already present


@dataclass(eq=False)
class Block:
    key: tuple[LayoutKey, bytes]
    pool: SlotPool
    slot: int
    pins: int = 0
    crc32: Optional[int] = None  # of the payload, when its writer (or the store) computed one

    @property
    def nbytes(self) -> int:
        return self.pool.slot_bytes

    @property
    def payload(self) -> memoryview:
        return self.pool.view(self.slot)

    @property
    def remote(self) -> tuple[int, bytes]:
        return self.pool.remote(self.slot)


def leading_run(present: Sequence[bool]) -> int:
    """Blocks usable from the start of a chain: later blocks are useless without their parents' KV."""
    for i, flag in enumerate(present):
        if not flag:
            return i
    return len(present)


def _check_request(layout: common_pb2.KVLayout, hashes: Sequence[bytes]) -> int:
    size = block_bytes(layout)
    for i, block_hash in enumerate(hashes):
        if not block_hash:
            raise InvalidRequestError(f"block hash {i} is empty", "block_hashes")
    return size


class BlockStore:
    def __init__(self, capacity_bytes: int, default_lease_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, allocate_slab: SlabAllocator = anonymous_slab):
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes must be >= 1, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._allocate_slab = allocate_slab
        self._leases = LeaseTable(default_lease_s, clock)
        self._pools: dict[int, SlotPool] = {}  # by block bytes
        self._blocks: dict[tuple[LayoutKey, bytes], Block] = {}  # committed, visible
        self._lru: OrderedDict[tuple[LayoutKey, bytes], Block] = OrderedDict()  # visible, unpinned; oldest first
        self._layout_keys: set[LayoutKey] = set()  # every layout ever committed: a handful per store
        # Plain counters, so stats() walks no container while the metrics thread scrapes it.
        self._bytes_used = self._blocks_used = self._evictable_bytes = self._pinned_blocks = 0
        self._max_block_bytes = 0
        self._hits = self._misses = self._evictions = self._expired_leases = 0

    # ---- readers -------------------------------------------------------------------------------------------

    def lookup(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes]) -> list[bool]:
        _check_request(layout, hashes)
        self.expire()
        key = layout_key(layout)
        present = []
        for block_hash in hashes:
            block = self._blocks.get((key, block_hash))
            if block is not None and block.pins == 0:
                self._lru.move_to_end(block.key)
            present.append(block is not None)
        self._count(len(hashes), sum(present))
        return present

    def pin(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes], lease_s: Optional[float] = None,
            request_id: str = "") -> tuple[str, list[bool]]:
        """Pins every present block (absent ones are reported False); returns (pin_id, pinned flags)."""
        _check_request(layout, hashes)
        self.expire()
        key = layout_key(layout)
        lease = self._leases.open("p", key, lease_s, request_id)
        pinned = []
        for block_hash in hashes:
            block = self._blocks.get((key, block_hash))
            if block is not None:
                self._pin(block, lease)
            pinned.append(block is not None)
        self._count(len(hashes), sum(pinned))
        return lease.lease_id, pinned

    def pin_leading(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes],
                    lease_s: Optional[float] = None, request_id: str = "") -> tuple[str, list[memoryview]]:
        """Pins the longest leading run of present blocks; returns (pin_id, their payloads without a copy)."""
        pin_id, blocks = self.pin_leading_blocks(layout, hashes, lease_s, request_id)
        return pin_id, [block.payload for block in blocks]

    def pin_leading_blocks(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes],
                           lease_s: Optional[float] = None, request_id: str = "") -> tuple[str, list[Block]]:
        """Pins the longest leading run of present blocks; returns (pin_id, those blocks).

        Raises LayoutConflictError when the first block not found is held under another layout: the reader and
        the writer disagree about the KV format, which a silent miss would hide behind endless recomputes.
        """
        _check_request(layout, hashes)
        self.expire()
        key = layout_key(layout)
        found = []
        for block_hash in hashes:
            block = self._blocks.get((key, block_hash))
            if block is None:
                for other in self._layout_keys - {key}:
                    if (other, block_hash) in self._blocks:
                        raise conflict(block_hash, other, layout)
                break
            found.append(block)
        lease = self._leases.open("p", key, lease_s, request_id)
        for block in found:
            self._pin(block, lease)
        self._count(len(hashes), len(found))
        return lease.lease_id, found

    def pinned_blocks(self, pin_id: str) -> list[Block]:
        """The blocks a pin holds, in the order of the hashes that pinned them."""
        return list(self._leases.get(pin_id).pinned)

    # ---- writers -------------------------------------------------------------------------------------------

    def reserve(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes], lease_s: Optional[float] = None,
                request_id: str = "") -> Reservation:
        """Takes slots for the absent blocks and pins the present ones, evicting LRU blocks to make room.

        All or nothing: raises StoreFullError (taking nothing) if the unpinned blocks cannot free enough bytes.
        """
        size = _check_request(layout, hashes)
        self.expire()
        key = layout_key(layout)
        lease = self._leases.open("r", key, lease_s, request_id)
        new_hashes = []
        for block_hash in dict.fromkeys(hashes):
            block = self._blocks.get((key, block_hash))
            if block is not None:
                self._pin(block, lease)
            else:
                new_hashes.append(block_hash)
        try:
            self._make_room(len(new_hashes) * size, len(new_hashes))
        except StoreFullError:
            self._end(lease)
            raise
        if new_hashes:
            pool = self._pool(size)
            for block_hash, slot in zip(new_hashes, pool.allocate_many(len(new_hashes))):
                lease.reserved[block_hash] = Block((key, block_hash), pool, slot)
            self._bytes_used += size * len(new_hashes)
            self._blocks_used += len(new_hashes)
        slots = [lease.reserved[h].remote if h in lease.reserved else None for h in hashes]
        return Reservation(lease.lease_id, size, [(key, h) in self._blocks for h in hashes], slots)

    def write(self, reservation_id: str, block_hash: bytes, offset: int, data: bytes) -> None:
        """Copies part of a reserved block's payload into its slot (the gRPC data plane; UCX writes directly)."""
        block = self._leases.get(reservation_id).reserved.get(block_hash)
        if block is None:
            raise InvalidRequestError(f"block {block_hash.hex()} has no slot in reservation {reservation_id}",
                                      "block_hashes")
        view = block.pool.view(block.slot)
        if offset + len(data) > len(view):
            raise LayoutError(f"block {block_hash.hex()}: {offset + len(data)} bytes of payload exceed the "
                              f"{len(view)} bytes its layout needs")
        view[offset:offset + len(data)] = data

    def reserved_payloads(self, reservation_id: str, hashes: Sequence[bytes]) -> list[Optional[memoryview]]:
        """The slots a reservation took for these hashes (None for blocks that were already present)."""
        lease = self._leases.get(reservation_id)
        return [lease.reserved[h].payload if h in lease.reserved else None for h in hashes]

    def commit(self, reservation_id: str, hashes: Sequence[bytes],
               crc32s: Optional[Sequence[Optional[int]]] = None) -> int:
        """Makes the listed reserved blocks visible and ends the reservation; unlisted reserved slots are freed.

        `crc32s` (parallel to `hashes`) are kept with the new blocks for readers to verify. Returns how many
        listed blocks the store now holds from this reservation (new or already present).
        """
        self.expire()
        if crc32s is not None and len(crc32s) != len(hashes):
            raise InvalidRequestError(f"{len(crc32s)} checksums for {len(hashes)} blocks", "block_crc32")
        lease = self._leases.get(reservation_id)
        for block_hash in hashes:
            if block_hash not in lease.reserved and (lease.layout_key, block_hash) not in self._blocks:
                raise InvalidRequestError(f"block {block_hash.hex()} is not part of reservation {reservation_id}",
                                          "block_hashes")
        committed = 0
        checksums = dict(zip(hashes, crc32s)) if crc32s is not None else {}
        for block_hash in dict.fromkeys(hashes):
            block = lease.reserved.pop(block_hash, None)
            if block is not None and block.key not in self._blocks:
                block.crc32 = checksums.get(block_hash)
                self._blocks[block.key] = self._lru[block.key] = block
                self._evictable_bytes += block.nbytes
                self._layout_keys.add(lease.layout_key)
            elif block is not None:  # another writer committed the same content first
                self._free(block)
            committed += 1
        self._end(lease)
        return committed

    def holds(self, lease_id: str) -> bool:
        """Whether a pin or reservation is still open (not released, committed or expired)."""
        self.expire()
        return self._leases.find(lease_id) is not None

    def release(self, lease_id: str) -> int:
        """Drops a pin or reservation; returns how many blocks it held. Unknown (e.g. expired) ids release 0."""
        self.expire()
        lease = self._leases.find(lease_id)
        return self._end(lease) if lease is not None else 0

    # ---- housekeeping --------------------------------------------------------------------------------------

    def expire(self) -> int:
        """Ends every lease past its expiry; returns how many. Called by each operation and by the server's sweep."""
        expired = 0
        for lease in self._leases.pop_expired():
            self._let_go(lease)
            expired += 1
            log.warning("lease %s (request %r) expired holding %d blocks; its holder likely crashed",
                        lease.lease_id, lease.request_id, lease.num_blocks)
        self._expired_leases += expired
        return expired

    def stats(self) -> StoreStats:
        """Counters only, no container walks: safe to call from the metrics server's thread."""
        biggest = self._max_block_bytes
        return StoreStats(
            blocks_used=self._blocks_used, blocks_capacity=self.capacity_bytes // biggest if biggest else 0,
            bytes_used=self._bytes_used, bytes_capacity=self.capacity_bytes, pinned_blocks=self._pinned_blocks,
            hits=self._hits, misses=self._misses, evictions=self._evictions, expired_leases=self._expired_leases)

    # ---- internals -----------------------------------------------------------------------------------------

    def _count(self, asked: int, found: int) -> None:
        self._hits += found
        self._misses += asked - found

    def _pool(self, size: int) -> SlotPool:
        pool = self._pools.get(size)
        if pool is None:
            pool = self._pools[size] = SlotPool(size, self.capacity_bytes // size, self._allocate_slab)
            self._max_block_bytes = max(self._max_block_bytes, size)
        return pool

    def _make_room(self, nbytes: int, nblocks: int) -> None:
        free = self.capacity_bytes - self._bytes_used
        if nbytes > free + self._evictable_bytes:
            raise StoreFullError(
                f"kv-store full: {nblocks} new blocks need {nbytes} bytes; {free} free of {self.capacity_bytes} "
                f"and only {self._evictable_bytes} evictable (the rest is pinned or reserved)")
        while self.capacity_bytes - self._bytes_used < nbytes:
            _, block = self._lru.popitem(last=False)
            del self._blocks[block.key]
            self._evictable_bytes -= block.nbytes
            self._free(block)
            self._evictions += 1

    def _free(self, block: Block) -> None:
        block.pool.free(block.slot)
        self._bytes_used -= block.nbytes
        self._blocks_used -= 1

    def _pin(self, block: Block, lease: Lease) -> None:
        if block.pins == 0:
            del self._lru[block.key]
            self._evictable_bytes -= block.nbytes
            self._pinned_blocks += 1
        block.pins += 1
        lease.pinned.append(block)

    def _unpin(self, block: Block) -> None:
        block.pins -= 1
        if block.pins == 0:
            self._lru[block.key] = block  # just read: most recently used
            self._evictable_bytes += block.nbytes
            self._pinned_blocks -= 1

    def _end(self, lease: Lease) -> int:
        self._leases.close(lease)
        return self._let_go(lease)

    def _let_go(self, lease: Lease) -> int:
        for block in lease.pinned:
            self._unpin(block)
        for block in lease.reserved.values():
            self._free(block)
        return lease.num_blocks
