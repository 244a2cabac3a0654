"""The kv-store's block pool: KV blocks in host RAM keyed by (layout, block hash), under a byte capacity.

Writers reserve slots, fill them, and commit them visible; readers pin blocks while they copy them out. Both
reservations and pins are leases that expire, so a crashed peer cannot hold memory forever. Inserting evicts
least-recently-used blocks that nobody pins. Synchronous and free of gRPC: the service calls it from one event
loop, so there are no locks, and every call costs O(blocks it names) plus the evictions it causes.

A block is not an object but entries under its hash in its layout's dicts (slot, pin count, checksum), and a
call works on its hash list in bulk where it can (dict and list builtins, slot addresses in one pass): an
engine's transfer names thousands of small blocks, and per-block objects made Reserve of 2000 blocks cost 5 ms
(benchmarks/kv_store_control.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import compress, filterfalse, groupby, repeat
from operator import itemgetter
from typing import Callable, Optional, Sequence

from splitserve.kv_events.change_log import ChangeLog
from splitserve.v1 import common_pb2, kv_store_pb2
from splitserve.sampling_params import InvalidRequestError
from splitserve.services.kv_store.block_layout import LayoutError, LayoutKey, block_bytes, conflict, layout_key
from splitserve.services.kv_store.leases import Lease, LeaseTable
from splitserve.services.kv_store.slot_pool import SlabAllocator, SlotPool, anonymous_slab

log = logging.getLogger(__name__)


class StoreFullError(RuntimeError):
    """Room for new blocks cannot be made because everything that could be evicted is pinned or reserved."""


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    block_bytes: int
    already_present: list[bool]  # parallel to the reserved hashes
    addresses: list[int]  # parallel: the slot to write each new block to (UCX); 0 where already present
    rkey: bytes  # packed UCX remote key that opens every address (a layout's slots share one slab)


@dataclass(frozen=True)
class PinnedBlocks:
    pin_id: str
    block_bytes: int
    pinned: list[bool]  # parallel to the hashes asked for
    addresses: list[int]  # parallel: the slot of each pinned block (UCX); 0 where not pinned
    rkey: bytes
    crc32s: list[Optional[int]]  # parallel: each pinned payload's checksum, where its writer or the store made one


@dataclass(eq=False)
class LayoutBlocks:
    """The visible blocks of one layout, by hash. A layout fixes the block size, so they share one slot pool."""

    key: LayoutKey
    pool: SlotPool
    slots: dict[bytes, int] = field(default_factory=dict)  # hash -> slot
    pins: dict[bytes, int] = field(default_factory=dict)  # hash -> pin count, for pinned blocks only
    # hash -> checksum, for blocks committed along with checksums (None where the writer had none for it)
    crc32: dict[bytes, Optional[int]] = field(default_factory=dict)
    # Discarded (a reader found them corrupt) while pinned: hidden from readers, dropped at their last unpin.
    doomed: set[bytes] = field(default_factory=set)


def leading_run(present: Sequence[bool]) -> int:
    """Blocks usable from the start of a chain: later blocks are useless without their parents' KV."""
    for i, flag in enumerate(present):
        if not flag:
            return i
    return len(present)


def _check_request(layout: common_pb2.KVLayout, hashes: Sequence[bytes]) -> int:
    size = block_bytes(layout)
    if not all(hashes):
        raise InvalidRequestError(f"block hash {[bool(h) for h in hashes].index(False)} is empty", "block_hashes")
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
        self._layouts: dict[LayoutKey, LayoutBlocks] = {}  # every layout ever reserved: a handful per store
        # Visible, unpinned blocks, oldest first (the values are unused).
        self._lru: OrderedDict[tuple[LayoutBlocks, bytes], None] = OrderedDict()
        # Plain counters, so stats() walks no container while the metrics thread scrapes it.
        self._bytes_used = self._blocks_used = self._evictable_bytes = self._pinned_blocks = 0
        self._max_block_bytes = 0
        self._hits = self._misses = self._evictions = self._expired_leases = 0
        self.changes = ChangeLog()  # for KV events, when the server publishes them

    # ---- readers -------------------------------------------------------------------------------------------

    def lookup(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes]) -> list[bool]:
        _check_request(layout, hashes)
        self.expire()
        blocks = self._layouts.get(layout_key(layout))
        if blocks is None:
            present = [False] * len(hashes)
        else:
            present = list(map(blocks.slots.__contains__, hashes))
            if blocks.doomed:
                present = [p and h not in blocks.doomed for h, p in zip(hashes, present)]
            for block_hash in filter(blocks.slots.__contains__, hashes):
                if block_hash not in blocks.pins:
                    self._lru.move_to_end((blocks, block_hash))
        self._count(len(hashes), present.count(True))
        return present

    def pin(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes], lease_s: Optional[float] = None,
            request_id: str = "", leading_run: bool = False) -> PinnedBlocks:
        """Pins every present block, or with `leading_run` the longest leading run of present blocks.

        With `leading_run`, raises LayoutConflictError when the first block not found is held under another
        layout: the reader and the writer disagree about the KV format, which a silent miss would hide behind
        endless recomputes.
        """
        size = _check_request(layout, hashes)
        self.expire()
        key = layout_key(layout)
        blocks = self._layouts.get(key)
        slots = list(map(blocks.slots.get, hashes)) if blocks is not None else [None] * len(hashes)
        if blocks is not None and blocks.doomed:
            slots = [None if h in blocks.doomed else slot for h, slot in zip(hashes, slots)]
        if leading_run:
            found = slots.index(None) if None in slots else len(slots)
            if found < len(hashes):
                self._refuse_conflict(key, hashes[found], layout)
                slots[found:] = repeat(None, len(slots) - found)
            pinned = [True] * found + [False] * (len(hashes) - found)
        else:
            pinned = [slot is not None for slot in slots]
        lease = self._leases.open("p", key, lease_s, request_id)
        hits = list(compress(hashes, pinned))
        self._count(len(hashes), len(hits))
        if not hits:
            return PinnedBlocks(lease.lease_id, size, pinned, [0] * len(hashes), b"", [None] * len(hashes))
        self._pin(blocks, lease, hits)
        crc32s = ([blocks.crc32.get(h) if slot is not None else None for h, slot in zip(hashes, slots)]
                  if blocks.crc32 else [None] * len(hashes))
        return PinnedBlocks(lease.lease_id, size, pinned, blocks.pool.addresses(slots), blocks.pool.slab.rkey,
                            crc32s)

    def pinned_payloads(self, pin_id: str) -> list[memoryview]:
        """The payloads a pin holds, without a copy, in the order of the hashes that pinned them."""
        lease = self._leases.get(pin_id)
        if not lease.pinned:
            return []
        blocks = self._layouts[lease.layout_key]
        return [blocks.pool.view(blocks.slots[h]) for h in lease.pinned]

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
        blocks = self._layouts.get(key)
        listed = list(dict.fromkeys(hashes))
        visible = blocks.slots if blocks is not None else {}
        new_hashes = list(filterfalse(visible.__contains__, listed))
        if len(new_hashes) < len(listed):
            self._pin(blocks, lease, list(filter(visible.__contains__, listed)))
        try:
            self._make_room(len(new_hashes) * size, len(new_hashes))
        except StoreFullError:
            self._end(lease)
            raise
        if not new_hashes:
            return Reservation(lease.lease_id, size, [True] * len(hashes), [0] * len(hashes), b"")
        if blocks is None:
            blocks = self._layouts[key] = LayoutBlocks(key, self._pool(size))
        slots = blocks.pool.allocate_many(len(new_hashes))
        lease.reserved.update(zip(new_hashes, slots))
        self._bytes_used += size * len(new_hashes)
        self._blocks_used += len(new_hashes)
        addresses = blocks.pool.addresses(slots)
        if len(new_hashes) == len(hashes):  # all new, none twice: the common case, in the hashes' order
            return Reservation(lease.lease_id, size, [False] * len(hashes), addresses, blocks.pool.slab.rkey)
        by_hash = dict(zip(new_hashes, addresses))
        return Reservation(lease.lease_id, size, list(map(blocks.slots.__contains__, hashes)),
                           list(map(by_hash.get, hashes, repeat(0))), blocks.pool.slab.rkey)

    def write(self, reservation_id: str, block_hash: bytes, offset: int, data: bytes) -> None:
        """Copies part of a reserved block's payload into its slot (the gRPC data plane; UCX writes directly)."""
        lease = self._leases.get(reservation_id)
        slot = lease.reserved.get(block_hash)
        if slot is None:
            raise InvalidRequestError(f"block {block_hash.hex()} has no slot in reservation {reservation_id}",
                                      "block_hashes")
        view = self._layouts[lease.layout_key].pool.view(slot)
        if offset + len(data) > len(view):
            raise LayoutError(f"block {block_hash.hex()}: {offset + len(data)} bytes of payload exceed the "
                              f"{len(view)} bytes its layout needs")
        view[offset:offset + len(data)] = data

    def reserved_payloads(self, reservation_id: str, hashes: Sequence[bytes]) -> list[Optional[memoryview]]:
        """The slots a reservation took for these hashes (None for blocks that were already present)."""
        lease = self._leases.get(reservation_id)
        if not lease.reserved:
            return [None] * len(hashes)
        pool = self._layouts[lease.layout_key].pool
        return [pool.view(lease.reserved[h]) if h in lease.reserved else None for h in hashes]

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
        blocks = self._layouts.get(lease.layout_key)
        visible = blocks.slots if blocks is not None else {}
        for block_hash in filterfalse(lease.reserved.__contains__, hashes):
            if block_hash not in visible:
                raise InvalidRequestError(f"block {block_hash.hex()} is not part of reservation {reservation_id}",
                                          "block_hashes")
        listed = dict.fromkeys(hashes)
        new_hashes = list(filter(lease.reserved.__contains__, listed))
        if new_hashes:
            slots = list(map(lease.reserved.pop, new_hashes))
            if any(map(visible.__contains__, new_hashes)):  # another writer committed the same content first
                ours = [h not in visible for h in new_hashes]
                self._free(blocks.pool, [slot for slot, mine in zip(slots, ours) if not mine])
                new_hashes, slots = list(compress(new_hashes, ours)), list(compress(slots, ours))
            visible.update(zip(new_hashes, slots))
            self.changes.stored(new_hashes)
            if crc32s is not None:
                checksums = dict(zip(hashes, crc32s))
                blocks.crc32.update(zip(new_hashes, map(checksums.get, new_hashes)))
            lru = self._lru
            for block_hash in new_hashes:  # 2000 keys: 0.2 ms, against 0.3-0.5 ms through OrderedDict.update
                lru[blocks, block_hash] = None
            self._evictable_bytes += blocks.pool.slot_bytes * len(new_hashes)
        self._end(lease)
        return len(listed)

    def holds(self, lease_id: str) -> bool:
        """Whether a pin or reservation is still open (not released, committed or expired)."""
        self.expire()
        return self._leases.find(lease_id) is not None

    def release(self, lease_id: str) -> int:
        """Drops a pin or reservation; returns how many blocks it held. Unknown (e.g. expired) ids release 0."""
        self.expire()
        lease = self._leases.find(lease_id)
        return self._end(lease) if lease is not None else 0

    def discard(self, layout: common_pb2.KVLayout, hashes: Sequence[bytes]) -> int:
        """Forgets blocks a reader found corrupt, so the next writer of them stores them afresh (first writer
        wins otherwise: a bad block would stay until evicted and fail every reader). An unpinned block goes at
        once; a pinned one is hidden from readers now and dropped at its last unpin (its readers hold its slot;
        a writer meanwhile finds it present, since one hash has one slot, and the writer after the drop replaces
        it). Returns how many of `hashes` were held."""
        _check_request(layout, hashes)
        self.expire()
        blocks = self._layouts.get(layout_key(layout))
        if blocks is None:
            return 0
        held = [h for h in dict.fromkeys(hashes) if h in blocks.slots and h not in blocks.doomed]
        now = [h for h in held if h not in blocks.pins]
        blocks.doomed.update(h for h in held if h in blocks.pins)
        for block_hash in now:
            del self._lru[blocks, block_hash]
        self._evictable_bytes -= blocks.pool.slot_bytes * len(now)
        self._drop(blocks, now)
        return len(held)

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

    def stats(self) -> kv_store_pb2.KVStoreStatsResponse:
        """Counters only, no container walks: safe to call from the metrics server's thread."""
        biggest = self._max_block_bytes
        return kv_store_pb2.KVStoreStatsResponse(
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

    def _refuse_conflict(self, key: LayoutKey, block_hash: bytes, layout: common_pb2.KVLayout) -> None:
        for other in self._layouts.values():
            if other.key != key and block_hash in other.slots:
                raise conflict(block_hash, other.key, layout)

    def _make_room(self, nbytes: int, nblocks: int) -> None:
        free = self.capacity_bytes - self._bytes_used
        if nbytes > free + self._evictable_bytes:
            raise StoreFullError(
                f"kv-store full: {nblocks} new blocks need {nbytes} bytes; {free} free of {self.capacity_bytes} "
                f"and only {self._evictable_bytes} evictable (the rest is pinned or reserved)")
        lru, evicted, freed = self._lru, [], 0
        while free + freed < nbytes:
            key, _ = lru.popitem(last=False)
            evicted.append(key)
            freed += key[0].pool.slot_bytes
        for blocks, keys in groupby(evicted, itemgetter(0)):  # mostly one layout: its blocks are freed at once
            self._drop(blocks, list(map(itemgetter(1), keys)))
        self._evictable_bytes -= freed
        self._evictions += len(evicted)

    def _drop(self, blocks: LayoutBlocks, hashes: list[bytes]) -> None:
        """Frees visible, unpinned blocks that are out of the LRU already (evicted or discarded)."""
        self._free(blocks.pool, list(map(blocks.slots.pop, hashes)))
        self.changes.removed(hashes)
        if blocks.crc32:
            for block_hash in hashes:
                blocks.crc32.pop(block_hash, None)

    def _free(self, pool: SlotPool, slots: list[int]) -> None:
        pool.free_many(slots)
        self._bytes_used -= pool.slot_bytes * len(slots)
        self._blocks_used -= len(slots)

    def _pin(self, blocks: LayoutBlocks, lease: Lease, hashes: list[bytes]) -> None:
        """Pins visible blocks (a hash listed twice, twice); a block's first pin takes it out of the LRU."""
        pins, lru = blocks.pins, self._lru
        first_pins = 0
        for block_hash in hashes:
            count = pins.get(block_hash, 0)
            if not count:
                del lru[blocks, block_hash]
                first_pins += 1
            pins[block_hash] = count + 1
        self._evictable_bytes -= blocks.pool.slot_bytes * first_pins
        self._pinned_blocks += first_pins
        lease.pinned.extend(hashes)

    def _unpin(self, blocks: LayoutBlocks, hashes: list[bytes]) -> None:
        pins, lru = blocks.pins, self._lru
        last_pins = 0
        doomed: list[bytes] = []
        for block_hash in hashes:
            count = pins.pop(block_hash) - 1
            if count:
                pins[block_hash] = count
            elif blocks.doomed and block_hash in blocks.doomed:
                blocks.doomed.discard(block_hash)
                doomed.append(block_hash)
            else:
                lru[blocks, block_hash] = None  # just read: most recently used
                last_pins += 1
        self._evictable_bytes += blocks.pool.slot_bytes * last_pins
        self._pinned_blocks -= last_pins + len(doomed)
        if doomed:
            self._drop(blocks, doomed)

    def _end(self, lease: Lease) -> int:
        self._leases.close(lease)
        return self._let_go(lease)

    def _let_go(self, lease: Lease) -> int:
        if lease.pinned or lease.reserved:
            blocks = self._layouts[lease.layout_key]
            self._unpin(blocks, lease.pinned)
            self._free(blocks.pool, list(lease.reserved.values()))
        return lease.num_blocks
