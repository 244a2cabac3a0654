"""KVStoreServicer in this process, on a store whose slabs carry an rkey: what Reserve and Pin put on the wire."""

import asyncio
import ctypes

import grpc
import pytest

from splitserve.v1 import common_pb2, kv_store_pb2
from splitserve.services.kv_store.block_store import BlockStore
from splitserve.services.kv_store.metrics import POOL_METRICS, BlockStoreCollector
from splitserve.services.kv_store.servicer import KVStoreServicer, checksum_fields, fill_slot_addresses
from splitserve.services.kv_store.slot_pool import Slab, anonymous_slab

SMALL = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                            model_fingerprint="model-a")
S = 2 * 2 * 16 * 2 * 64 * 4  # 32 KiB
UCX = kv_store_pb2.DataPlaneEndpoint(transport="ucx", worker_address=b"worker")


class Aborted(Exception):
    pass


class Context:
    async def abort(self, code: grpc.StatusCode, details: str):
        raise Aborted(code, details)

    def set_trailing_metadata(self, metadata):
        pass


def slab_with_rkey(nbytes: int) -> Slab:
    slab = anonymous_slab(nbytes)
    return Slab(slab.memory, slab.address, rkey=b"rkey", owner=slab.owner)


def h(i: int) -> bytes:
    return i.to_bytes(16, "big")


def call(servicer, method: str, request):
    response = asyncio.run(getattr(servicer, method)(request, Context()))
    return type(response).FromString(response.SerializeToString())  # as the client parses it


def hashes(*ids: int) -> common_pb2.BlockHashes:
    return common_pb2.BlockHashes(hashes=[h(i) for i in ids])


def test_fill_slot_addresses_sends_one_rkey_and_only_when_there_is_a_slot():
    response = kv_store_pb2.ReserveResponse()
    fill_slot_addresses(response.slots, [0x1000, 0, 0x3000], b"rkey")
    assert list(response.slots.remote_addrs) == [0x1000, 0, 0x3000]
    assert list(response.slots.rkey_index) == [0, 0, 0] and list(response.slots.rkeys) == [b"rkey"]
    nothing = kv_store_pb2.ReserveResponse()
    fill_slot_addresses(nothing.slots, [0, 0], b"rkey")
    assert list(nothing.slots.rkeys) == [] and list(nothing.slots.rkey_index) == [0, 0]
    empty = kv_store_pb2.ReserveResponse()
    fill_slot_addresses(empty.slots, [], b"rkey")
    assert kv_store_pb2.ReserveResponse.FromString(empty.SerializeToString()).HasField("slots")


def test_checksum_fields_mark_which_checksums_exist():
    assert checksum_fields([7, None, 0]) == ([7, 0, 0], [True, False, True])
    assert checksum_fields([None, None]) == ([0, 0], [False, False])
    assert checksum_fields([]) == ([], [])


@pytest.fixture
def servicer():
    return KVStoreServicer(BlockStore(8 * S, allocate_slab=slab_with_rkey), is_draining=lambda: False,
                           endpoint=UCX)


def test_reserve_commit_pin_release_over_ucx_slots(servicer):
    reserved = call(servicer, "Reserve", kv_store_pb2.ReserveRequest(layout=SMALL, block_hashes=hashes(1, 2, 1)))
    assert reserved.block_bytes == S and list(reserved.already_present) == [False, False, False]
    one, two, one_again = reserved.slots.remote_addrs
    assert one == one_again and two == one + S  # ascending slots: adjacent blocks move in one copy
    assert list(reserved.slots.rkeys) == [b"rkey"] and list(reserved.slots.rkey_index) == [0, 0, 0]
    ctypes.memmove(one, b"\x01" * S, S)
    ctypes.memmove(two, b"\x02" * S, S)
    committed = call(servicer, "Commit", kv_store_pb2.CommitRequest(
        reservation_id=reserved.reservation_id, block_hashes=hashes(1, 2), block_crc32=[11, 22]))
    assert committed.committed_blocks == 2

    pin = call(servicer, "Pin", kv_store_pb2.PinRequest(layout=SMALL, block_hashes=hashes(2, 1, 5, 1),
                                                        leading_run=True))
    assert list(pin.pinned) == [True, True, False, False] and pin.block_bytes == S
    assert list(pin.locations.remote_addrs) == [two, one, 0, 0] and list(pin.locations.rkeys) == [b"rkey"]
    assert list(pin.crc32) == [22, 11, 0, 0] and list(pin.has_crc32) == [True, True, False, False]
    assert ctypes.string_at(pin.locations.remote_addrs[0], S) == b"\x02" * S
    released = call(servicer, "Release", kv_store_pb2.ReleaseRequest(pin_id=pin.pin_id))
    assert released.released_blocks == 2

    again = call(servicer, "Reserve", kv_store_pb2.ReserveRequest(layout=SMALL, block_hashes=hashes(2, 3)))
    assert list(again.already_present) == [True, False]
    assert again.slots.remote_addrs[0] == 0 and again.slots.remote_addrs[1] not in (0, one, two)
    call(servicer, "Release", kv_store_pb2.ReleaseRequest(pin_id=again.reservation_id))


def test_pin_of_every_present_block_leaves_gaps_without_a_slot(servicer):
    reserved = call(servicer, "Reserve", kv_store_pb2.ReserveRequest(layout=SMALL, block_hashes=hashes(1, 3)))
    call(servicer, "Commit", kv_store_pb2.CommitRequest(reservation_id=reserved.reservation_id,
                                                         block_hashes=hashes(1, 3)))
    pin = call(servicer, "Pin", kv_store_pb2.PinRequest(layout=SMALL, block_hashes=hashes(1, 2, 3)))
    assert list(pin.pinned) == [True, False, True]
    assert list(pin.locations.remote_addrs) == [reserved.slots.remote_addrs[0], 0, reserved.slots.remote_addrs[1]]
    assert list(pin.has_crc32) == [False, False, False] and list(pin.crc32) == [0, 0, 0]
    assert call(servicer, "Release", kv_store_pb2.ReleaseRequest(pin_id=pin.pin_id)).released_blocks == 2


def test_a_miss_hands_out_no_rkey_and_a_bad_request_is_refused(servicer):
    pin = call(servicer, "Pin", kv_store_pb2.PinRequest(layout=SMALL, block_hashes=hashes(1), leading_run=True))
    assert list(pin.pinned) == [False] and list(pin.locations.remote_addrs) == [0]
    assert list(pin.locations.rkeys) == []
    with pytest.raises(Aborted) as aborted:
        call(servicer, "Reserve", kv_store_pb2.ReserveRequest(
            layout=SMALL, block_hashes=common_pb2.BlockHashes(hashes=[h(1), b""])))
    assert aborted.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_stats_rpc_and_metrics_report_the_same_pool_expired_leases_included():
    clock = [0.0]
    store = BlockStore(8 * S, clock=lambda: clock[0], allocate_slab=slab_with_rkey)
    servicer = KVStoreServicer(store, is_draining=lambda: False, endpoint=UCX)
    call(servicer, "Reserve", kv_store_pb2.ReserveRequest(layout=SMALL, block_hashes=hashes(1, 2), lease_ms=1000))
    clock[0] += 1.0  # the writer never commits: its reservation runs out
    stats = call(servicer, "Stats", kv_store_pb2.KVStoreStatsRequest())
    assert (stats.expired_leases, stats.blocks_used, stats.pinned_blocks) == (1, 0, 0)
    assert stats.bytes_capacity == 8 * S
    exported = {metric.name: metric.samples[0].value for metric in BlockStoreCollector(store).collect()}
    for _, name, _, field in POOL_METRICS:
        assert exported[name.removesuffix("_total")] == getattr(stats, field), name
    assert exported["splitserve_kv_store_expired_leases"] == 1
