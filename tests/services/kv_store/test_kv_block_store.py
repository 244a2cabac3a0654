"""BlockStore alone: byte-capacity LRU, pins and reservations under leases (with a fake clock), layouts, stats."""

import ctypes

import pytest

from splitserve.v1 import common_pb2
from splitserve.sampling_params import InvalidRequestError
from splitserve.services.kv_store.block_layout import (LayoutConflictError, LayoutError, block_bytes,
                                                       check_payload_size)
from splitserve.services.kv_store.block_store import BlockStore, StoreFullError, leading_run
from splitserve.services.kv_store.leases import UnknownLeaseError
from splitserve.services.kv_store.slot_pool import Slab, SlotPool, SlotPoolExhaustedError, anonymous_slab

SMALL = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                            model_fingerprint="model-a")
S = 2 * 2 * 16 * 2 * 64 * 4  # 32 KiB
BIG = common_pb2.KVLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                          model_fingerprint="model-a")  # 2 * S


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def h(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, size: int = S) -> bytes:
    return bytes([i % 256]) * size


def put(store: BlockStore, layout, *ids: int) -> None:
    """What PutBlocks does: reserve, write the whole payload, commit."""
    hashes = [h(i) for i in ids]
    reservation = store.reserve(layout, hashes)
    size = block_bytes(layout)
    for i, present in zip(ids, reservation.already_present):
        if not present:
            store.write(reservation.reservation_id, h(i), 0, payload(i, size))
    assert store.commit(reservation.reservation_id, hashes) == len(set(hashes))


def held(store: BlockStore, layout, *ids: int) -> list[bool]:
    return store.lookup(layout, [h(i) for i in ids])


def pin_leading(store: BlockStore, layout, hashes: list[bytes]) -> tuple[str, list[memoryview]]:
    """What GetBlocks does: pin the leading run, read the payloads in place."""
    pin = store.pin(layout, hashes, leading_run=True)
    return pin.pin_id, store.pinned_payloads(pin.pin_id)


def test_block_bytes_follows_layout_and_dtype():
    assert block_bytes(SMALL) == S
    for dtype, size in (("float16", 2), ("bfloat16", 2), ("float8_e4m3fn", 1), ("float32", 4)):
        layout = common_pb2.KVLayout(num_layers=3, block_size=8, num_kv_heads=4, head_dim=32, dtype=dtype)
        assert block_bytes(layout) == 2 * 3 * 8 * 4 * 32 * size
    for _ in range(2):  # sizes are cached, refusals are not
        with pytest.raises(LayoutError, match="unknown KV dtype"):
            block_bytes(common_pb2.KVLayout(num_layers=1, block_size=1, num_kv_heads=1, head_dim=1, dtype="float7"))
    with pytest.raises(LayoutError, match="zero dimension"):
        block_bytes(common_pb2.KVLayout(num_layers=0, block_size=16, num_kv_heads=2, head_dim=64, dtype="float16"))


def test_payload_of_the_wrong_size_is_refused():
    check_payload_size(SMALL, h(1), S)
    with pytest.raises(LayoutError, match=f"has {S // 2} bytes of payload but its layout .* needs {S}") as err:
        check_payload_size(SMALL, h(1), S // 2)
    assert err.value.param == "layout"
    store = BlockStore(4 * S)
    reservation = store.reserve(SMALL, [h(1)])
    with pytest.raises(LayoutError, match="exceed"):
        store.write(reservation.reservation_id, h(1), S - 10, b"x" * 11)


def test_written_bytes_come_back_and_only_committed_blocks_are_visible():
    store = BlockStore(4 * S)
    reservation = store.reserve(SMALL, [h(1), h(2)])
    assert reservation.block_bytes == S and reservation.already_present == [False, False]
    store.write(reservation.reservation_id, h(1), 0, payload(7)[: S // 2])
    store.write(reservation.reservation_id, h(1), S // 2, payload(8)[: S // 2])
    assert held(store, SMALL, 1, 2) == [False, False]  # reserved, not yet visible
    assert store.commit(reservation.reservation_id, [h(1)]) == 1  # h(2) left out: its write failed
    assert held(store, SMALL, 1, 2) == [True, False]
    assert store.stats().bytes_used == S  # h(2)'s slot went back
    pin_id, [view] = pin_leading(store, SMALL, [h(1), h(2)])
    assert bytes(view) == payload(7)[: S // 2] + payload(8)[: S // 2]
    store.release(pin_id)


def test_lru_by_bytes_evicts_least_recently_used_first():
    store = BlockStore(3 * S)
    put(store, SMALL, 1, 2, 3)
    assert held(store, SMALL, 1) == [True]  # 1 is now more recent than 2 and 3
    put(store, SMALL, 4)
    assert held(store, SMALL, 1, 2, 3, 4) == [True, False, True, True]
    put(store, BIG, 5)  # 2 * S: evicts the two least recent (3, then 1)
    assert held(store, SMALL, 1, 3, 4) == [False, False, True]
    stats = store.stats()
    assert stats.evictions == 3 and stats.bytes_used == 3 * S and stats.blocks_used == 2
    assert stats.bytes_capacity == 3 * S and stats.blocks_capacity == 1  # counted in the largest block size seen


def test_pins_block_eviction_and_a_full_store_refuses_without_evicting():
    store = BlockStore(2 * S)
    put(store, SMALL, 1, 2)
    pin = store.pin(SMALL, [h(1), h(2), h(3)])
    assert pin.pinned == [True, True, False] and store.stats().pinned_blocks == 2
    with pytest.raises(StoreFullError, match="pinned or reserved"):
        store.reserve(SMALL, [h(3)])
    assert store.stats().evictions == 0 and store.stats().bytes_used == 2 * S
    assert store.release(pin.pin_id) == 2
    put(store, SMALL, 3)
    assert store.stats().evictions == 1 and store.stats().pinned_blocks == 0


def test_reserve_is_all_or_nothing():
    store = BlockStore(3 * S)
    put(store, SMALL, 1)
    pin_id = store.pin(SMALL, [h(1)]).pin_id
    with pytest.raises(StoreFullError):
        store.reserve(SMALL, [h(2), h(3), h(4)])  # needs 3 slots; only 2 can exist next to the pinned one
    assert store.stats().bytes_used == S and store.stats().evictions == 0
    store.release(pin_id)


def test_reserve_pins_present_blocks_until_commit():
    store = BlockStore(2 * S)
    put(store, SMALL, 1)
    reservation = store.reserve(SMALL, [h(1), h(2)])
    assert reservation.already_present == [True, False]
    with pytest.raises(StoreFullError):  # 1 is pinned by the reservation, 2 holds the other slot
        store.reserve(SMALL, [h(3)])
    store.write(reservation.reservation_id, h(2), 0, payload(2))
    assert store.commit(reservation.reservation_id, [h(1), h(2)]) == 2
    assert store.stats().pinned_blocks == 0
    put(store, SMALL, 3)  # both evictable again: one of them made room
    one, two, three = held(store, SMALL, 1, 2, 3)
    assert three and one + two == 1 and store.stats().evictions == 1


def test_pin_lease_expires():
    clock = FakeClock()
    store = BlockStore(2 * S, default_lease_s=30.0, clock=clock)
    put(store, SMALL, 1, 2)
    pin_id = store.pin(SMALL, [h(1), h(2)], lease_s=1.0).pin_id
    clock.now += 0.5
    assert store.expire() == 0 and store.stats().pinned_blocks == 2
    clock.now += 0.6
    assert store.expire() == 1
    stats = store.stats()
    assert stats.pinned_blocks == 0 and stats.expired_leases == 1
    assert store.release(pin_id) == 0  # already gone: releasing late is harmless
    put(store, SMALL, 3)  # evictable again
    assert store.stats().evictions == 1


def test_default_lease_applies_and_every_call_sweeps():
    clock = FakeClock()
    store = BlockStore(2 * S, default_lease_s=5.0, clock=clock)
    put(store, SMALL, 1)
    store.pin(SMALL, [h(1)])
    clock.now += 5.0
    assert held(store, SMALL, 1) == [True]  # lookup sweeps first
    assert store.stats().pinned_blocks == 0 and store.stats().expired_leases == 1


def test_uncommitted_reservation_expires_and_returns_its_space():
    clock = FakeClock()
    store = BlockStore(2 * S, clock=clock)
    reservation = store.reserve(SMALL, [h(1), h(2)], lease_s=2.0)
    assert store.stats().bytes_used == 2 * S
    with pytest.raises(StoreFullError):
        store.reserve(SMALL, [h(3)])
    clock.now += 2.0
    put(store, SMALL, 3)  # the sweep returned both slots
    assert store.stats().bytes_used == S and store.stats().expired_leases == 1
    with pytest.raises(UnknownLeaseError, match="expired"):
        store.commit(reservation.reservation_id, [h(1)])
    assert held(store, SMALL, 1, 2) == [False, False]


def test_release_of_a_reservation_frees_slots_and_unpins():
    store = BlockStore(3 * S)
    put(store, SMALL, 1)
    reservation = store.reserve(SMALL, [h(1), h(2), h(3)])
    assert store.release(reservation.reservation_id) == 3
    stats = store.stats()
    assert stats.bytes_used == S and stats.pinned_blocks == 0 and held(store, SMALL, 2) == [False]


def test_commit_refuses_hashes_it_did_not_reserve():
    store = BlockStore(2 * S)
    reservation = store.reserve(SMALL, [h(1)])
    with pytest.raises(InvalidRequestError, match="not part of reservation") as err:
        store.commit(reservation.reservation_id, [h(9)])
    assert err.value.param == "block_hashes"


def test_two_writers_of_the_same_block_keep_one_copy():
    store = BlockStore(4 * S)
    first, second = store.reserve(SMALL, [h(1)]), store.reserve(SMALL, [h(1)])
    for reservation in (first, second):
        store.write(reservation.reservation_id, h(1), 0, payload(1))
    assert store.commit(first.reservation_id, [h(1)]) == 1
    assert store.commit(second.reservation_id, [h(1)]) == 1
    assert store.stats().bytes_used == S and store.stats().blocks_used == 1


def test_layouts_are_isolated():
    store = BlockStore(4 * S)
    put(store, SMALL, 1, 2)
    other_model = common_pb2.KVLayout()
    other_model.CopyFrom(SMALL)
    other_model.model_fingerprint = "model-b"
    assert held(store, other_model, 1, 2) == [False, False]
    assert store.pin(other_model, [h(1)]).pinned == [False]
    # A reader asking for held content in another format gets a clear error, not a silent miss.
    with pytest.raises(LayoutConflictError, match="held as .*model model-a, requested as .*model model-b"):
        pin_leading(store, other_model, [h(1), h(2)])
    reservation = store.reserve(other_model, [h(1)])
    assert reservation.already_present == [False]
    store.write(reservation.reservation_id, h(1), 0, payload(50))
    store.commit(reservation.reservation_id, [h(1)])
    pin_a, [view_a] = pin_leading(store, SMALL, [h(1)])
    pin_b, [view_b] = pin_leading(store, other_model, [h(1)])
    assert bytes(view_a) == payload(1) and bytes(view_b) == payload(50)


def test_pin_leading_pins_only_the_leading_run():
    store = BlockStore(4 * S)
    put(store, SMALL, 1, 2, 4)
    pin_id, views = pin_leading(store, SMALL, [h(1), h(2), h(3), h(4)])
    assert [bytes(v) for v in views] == [payload(1), payload(2)]
    assert store.stats().pinned_blocks == 2
    store.release(pin_id)
    assert store.stats().pinned_blocks == 0


def test_hits_and_misses_are_counted_per_block():
    store = BlockStore(4 * S)
    put(store, SMALL, 1, 2)
    present = held(store, SMALL, 1, 3, 2)
    assert present == [True, False, True] and leading_run(present) == 1
    store.pin(SMALL, [h(1), h(5)])
    pin_leading(store, SMALL, [h(1), h(2), h(6), h(7)])  # a request's blocks past the first gap are misses too
    stats = store.stats()
    assert (stats.hits, stats.misses) == (2 + 1 + 2, 1 + 1 + 2)


def test_empty_hashes_are_invalid():
    store = BlockStore(S)
    with pytest.raises(InvalidRequestError, match="block hash 1 is empty") as err:
        store.lookup(SMALL, [h(1), b""])
    assert err.value.param == "block_hashes"


def test_slot_pool_reuses_freed_slots_and_refuses_past_its_size():
    pool = SlotPool(slot_bytes=8, num_slots=2)
    a, b = pool.allocate(), pool.allocate()
    pool.view(a)[:] = b"a" * 8
    pool.view(b)[:] = b"b" * 8
    assert bytes(pool.view(a)) == b"a" * 8 and pool.num_used == 2
    with pytest.raises(SlotPoolExhaustedError):
        pool.allocate()
    pool.free(a)
    assert pool.allocate() == a and bytes(pool.view(b)) == b"b" * 8


def test_slot_pool_hands_out_slots_in_bulk_ascending_reused_first_and_all_or_nothing():
    pool = SlotPool(slot_bytes=8, num_slots=6)
    assert pool.allocate_many(3) == [0, 1, 2]
    pool.free_many([2, 0])
    assert pool.allocate_many(3) == [0, 2, 3]  # the freed ones (resident pages) before fresh ones
    assert pool.num_used == 4
    with pytest.raises(SlotPoolExhaustedError, match="3 slots of 8 bytes asked for, 2 of 6 free"):
        pool.allocate_many(3)
    assert pool.num_used == 4 and pool.allocate_many(2) == [4, 5]  # the refused call took nothing
    base = pool.slab.address
    assert pool.addresses([0, None, 5]) == [base, 0, base + 5 * 8]


def slab_with_rkey(nbytes: int) -> Slab:
    slab = anonymous_slab(nbytes)
    return Slab(slab.memory, slab.address, rkey=b"rkey", owner=slab.owner)


def test_reservations_and_pins_hand_out_the_addresses_of_their_slots():
    store = BlockStore(8 * S, allocate_slab=slab_with_rkey)
    put(store, SMALL, 1)
    reservation = store.reserve(SMALL, [h(2), h(1), h(3), h(2)])  # a present block and a hash listed twice
    assert reservation.already_present == [False, True, False, False] and reservation.rkey == b"rkey"
    two, present, three, two_again = reservation.addresses
    assert present == 0 and two == two_again and 0 not in (two, three) and two != three
    for i, address in ((2, two), (3, three)):  # what an engine on this host does: write through the address
        ctypes.memmove(address, payload(i), S)
    assert store.commit(reservation.reservation_id, [h(2), h(1), h(3)]) == 3
    pin = store.pin(SMALL, [h(3), h(9), h(2)])
    assert pin.pinned == [True, False, True] and pin.addresses == [three, 0, two] and pin.rkey == b"rkey"
    assert [bytes(view) for view in store.pinned_payloads(pin.pin_id)] == [payload(3), payload(2)]
    assert ctypes.string_at(pin.addresses[0], S) == payload(3)
    store.release(pin.pin_id)


def test_checksums_come_back_with_their_blocks_and_leave_with_them():
    store = BlockStore(3 * S)
    reservation = store.reserve(SMALL, [h(1), h(2), h(3)])
    assert store.commit(reservation.reservation_id, [h(1), h(2)], [111, None]) == 2  # h(3)'s write failed
    pin = store.pin(SMALL, [h(1), h(2), h(3)], leading_run=True)
    assert pin.pinned == [True, True, False] and pin.crc32s == [111, None, None]
    store.release(pin.pin_id)
    put(store, SMALL, 4, 5, 6)  # evicts 1 and 2
    reservation = store.reserve(SMALL, [h(1)])
    assert store.commit(reservation.reservation_id, [h(1)]) == 1  # stored again, this time without a checksum
    assert store.pin(SMALL, [h(1)]).crc32s == [None]


def test_a_second_writer_of_a_block_keeps_the_first_ones_checksum_and_slot():
    store = BlockStore(4 * S)
    first, second = store.reserve(SMALL, [h(1)]), store.reserve(SMALL, [h(1), h(2)])
    assert store.commit(first.reservation_id, [h(1)], [111]) == 1
    assert store.commit(second.reservation_id, [h(1), h(2)], [222, 333]) == 2
    assert store.pin(SMALL, [h(1), h(2)]).crc32s == [111, 333]
    assert store.stats().blocks_used == 2 and store.stats().bytes_used == 2 * S


def test_a_hash_listed_twice_is_pinned_and_released_twice():
    store = BlockStore(2 * S)
    put(store, SMALL, 1, 2)
    pin = store.pin(SMALL, [h(1), h(1), h(2)], leading_run=True)
    assert pin.pinned == [True, True, True] and store.stats().pinned_blocks == 2
    assert len(store.pinned_payloads(pin.pin_id)) == 3
    assert store.release(pin.pin_id) == 3
    assert store.stats().pinned_blocks == 0 and store.stats().hits == 3


def test_a_block_read_under_a_pin_becomes_the_most_recently_used():
    store = BlockStore(3 * S)
    put(store, SMALL, 1, 2, 3)
    pin_id, _ = pin_leading(store, SMALL, [h(1)])
    assert held(store, SMALL, 1, 2) == [True, True]  # a lookup does not move a pinned block (2 moves)
    store.release(pin_id)  # 1 was read last: order 3, 2, 1
    put(store, SMALL, 4)
    assert held(store, SMALL, 1, 2, 3, 4) == [True, True, False, True]


def _corrupt_put(store: BlockStore, i: int, good_crc: int) -> None:
    """A writer whose bytes were torn: the block is committed (the store does not verify) with the right checksum."""
    reservation = store.reserve(SMALL, [h(i)])
    store.write(reservation.reservation_id, h(i), 0, payload(i + 1))
    store.commit(reservation.reservation_id, [h(i)], [good_crc])


def test_a_discarded_block_is_replaced_by_the_next_writer():
    store = BlockStore(capacity_bytes=8 * S)
    _corrupt_put(store, 1, 1234)
    put(store, SMALL, 2)
    before = store.stats()
    assert store.discard(SMALL, [h(1), h(7)]) == 1  # h(7) is not held
    assert held(store, SMALL, 1, 2) == [False, True]
    after = store.stats()
    assert (after.blocks_used, after.bytes_used) == (before.blocks_used - 1, before.bytes_used - S)
    reservation = store.reserve(SMALL, [h(1)])
    assert reservation.already_present == [False]  # first writer no longer wins: this one writes it afresh
    store.write(reservation.reservation_id, h(1), 0, payload(1))
    store.commit(reservation.reservation_id, [h(1)], [4321])
    pin = store.pin(SMALL, [h(1)])
    assert bytes(store.pinned_payloads(pin.pin_id)[0]) == payload(1) and pin.crc32s == [4321]
    store.release(pin.pin_id)
    assert store.stats().pinned_blocks == 0
    # The store's room is whole: 8 blocks fit (no slot was lost).
    put(store, SMALL, *range(10, 16))
    assert store.stats().blocks_used == 8


def test_a_discarded_block_still_pinned_is_hidden_then_dropped_at_its_last_unpin():
    store = BlockStore(capacity_bytes=4 * S)
    _corrupt_put(store, 1, 1234)
    first, second = store.pin(SMALL, [h(1)]), store.pin(SMALL, [h(1)])
    assert store.discard(SMALL, [h(1)]) == 1
    assert store.discard(SMALL, [h(1)]) == 0  # already going
    assert held(store, SMALL, 1) == [False]
    assert store.pin(SMALL, [h(1)], leading_run=True).pinned == [False]  # no new reader gets it
    assert bytes(store.pinned_payloads(first.pin_id)[0]) == payload(2)  # its readers' memory stays theirs
    store.release(first.pin_id)
    assert store.stats().blocks_used == 1 and store.stats().pinned_blocks == 1
    store.release(second.pin_id)
    stats = store.stats()
    assert (stats.blocks_used, stats.bytes_used, stats.pinned_blocks) == (0, 0, 0)
    put(store, SMALL, 1, 2, 3, 4)  # the whole capacity is usable again, the discarded block written afresh
    assert held(store, SMALL, 1, 2, 3, 4) == [True] * 4


def test_commits_evictions_and_discards_are_recorded_for_kv_events():
    """What the prefix index learns from the store: each block that became readable and each that went, in
    order, once the server asked for them (an unpublished store keeps nothing)."""
    store = BlockStore(capacity_bytes=3 * S)
    put(store, SMALL, 1)
    assert store.changes.drain() == []
    store.changes.record()
    put(store, SMALL, 2, 3)
    put(store, SMALL, 4)                       # full: the oldest (1) is evicted first
    store.discard(SMALL, [h(3)])
    assert store.changes.drain() == [(True, h(2)), (True, h(3)), (False, h(1)), (True, h(4)), (False, h(3))]
    assert store.changes.drain() == []
