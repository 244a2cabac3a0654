"""The UCX data plane end to end: a real `splitserve kv-store --kv-transport ucx` process and UcxKVTransport.

Checksums are on (the transports' flag and the store's --kv-checksum) except where a test says otherwise.
After every test the shared store must hold no pin and no reserved slot: `assert_whole` checks it through Stats.
"""

from __future__ import annotations

import asyncio
import ctypes
import time

import pytest
import torch
from ucx_required import require_ucx

ucx_rma = require_ucx()

from splitserve.kv_transfer.grpc_transport import GrpcKVTransport  # noqa: E402
from splitserve.kv_transfer.metrics import KV_TRANSPORT_FALLBACKS, KV_UCX_BLOCKS  # noqa: E402
from splitserve.kv_transfer.transport import KVLayoutMismatchError, KVTransferError  # noqa: E402
from splitserve.kv_transfer.ucx_copier import SlotRef, UcxBlockCopier  # noqa: E402
from splitserve.kv_transfer.ucx_transport import UcxKVTransport  # noqa: E402
from splitserve.v1 import common_pb2, kv_store_pb2  # noqa: E402
from store_process import chain, random_blocks  # noqa: E402

SMALL = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                            model_fingerprint="fp-small")
S = 2 * 2 * 16 * 2 * 64 * 4  # 32 KiB
LLAMA3_8B = common_pb2.KVLayout(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16",
                                model_fingerprint="fp-llama3-8b")
M = 2 * 32 * 16 * 8 * 128 * 2  # 2 MiB: one block of 16 tokens of Llama-3-8B
OTHER_MODEL = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                                  model_fingerprint="fp-other")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from store_process import StoreProcess

    process = StoreProcess(tmp_path_factory.mktemp("kv-store-ucx"), "--kv-transport", "ucx", "--kv-checksum",
                           "--capacity-bytes", str(400 << 20))
    try:
        yield process
    finally:
        process.stop()


def run(body, **transport_args):
    """Runs `body(transport)` on a fresh UcxKVTransport (checksums on unless told) in a fresh event loop."""
    async def go():
        transport = UcxKVTransport(**{"checksum": True, **transport_args})
        try:
            return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(go())


def assert_whole(store, stored_blocks: int | None = None) -> None:
    """No pin and no reservation left: every slot in use belongs to a stored block."""
    deadline = time.monotonic() + 5
    while store.stats().pinned_blocks and time.monotonic() < deadline:  # cleanups after a failure are async
        time.sleep(0.05)
    stats = store.stats()
    assert stats.pinned_blocks == 0
    if stored_blocks is not None:
        assert stats.blocks_used == stored_blocks


def stored_count(store, layout, hashes) -> int:
    request = kv_store_pb2.LookupRequest(layout=layout, block_hashes=common_pb2.BlockHashes(hashes=hashes))
    return sum(store.stub.Lookup(request, timeout=5).present)


def ucx_blocks(direction: str, path: str) -> float:
    return KV_UCX_BLOCKS.labels(direction, path)._value.get()


def test_store_advertises_its_ucx_worker_and_slot_keys(store):
    hashes = chain("adv", 2)
    reserved = store.stub.Reserve(kv_store_pb2.ReserveRequest(
        layout=SMALL, block_hashes=common_pb2.BlockHashes(hashes=hashes)), timeout=5)
    try:
        assert reserved.endpoint.transport == "ucx" and len(reserved.endpoint.worker_address) > 16
        slots = reserved.slots
        assert len(slots.rkeys) == 1 and slots.rkeys[0]  # one registration for the whole slab, sent once
        assert list(slots.rkey_index) == [0, 0]
        first, second = slots.remote_addrs
        assert abs(second - first) == S  # neighbouring slots of one slab
    finally:
        store.stub.Release(kv_store_pb2.ReleaseRequest(pin_id=reserved.reservation_id), timeout=5)
    assert_whole(store)


@pytest.mark.parametrize("layout,size,count", [(SMALL, S, 150), (LLAMA3_8B, M, 120)], ids=["32KiB", "2MiB"])
def test_blocks_round_trip_byte_identical(store, layout, size, count):
    hashes, blocks = chain(f"rt{size}", count), random_blocks(count, size, seed=count)
    before = store.stats().blocks_used
    mapped_before = ucx_blocks("put", "mapped") + ucx_blocks("get", "mapped")

    async def body(transport):
        assert await transport.put_blocks(store.address, layout, hashes, blocks, request_id="req-rt") == count
        assert await transport.put_blocks(store.address, layout, hashes, blocks) == count  # present: no copy
        return await transport.get_blocks(store.address, layout, hashes, request_id="req-rt")

    got = run(body)
    assert got.dtype == torch.uint8 and got.shape == (count, size) and torch.equal(got, blocks)
    # On one host the store's slab is mapped: both directions were direct copies, not RMA emulation.
    assert ucx_blocks("put", "mapped") + ucx_blocks("get", "mapped") == mapped_before + 2 * count
    assert_whole(store, before + count)


def test_get_into_a_callers_buffer(store):
    hashes, blocks = chain("out", 5), random_blocks(5, S, seed=3)
    staging = torch.zeros((8, S), dtype=torch.uint8)

    async def body(transport):
        await transport.put_blocks(store.address, SMALL, hashes, blocks)
        return await transport.get_blocks(store.address, SMALL, hashes, out=staging)

    got = run(body)
    assert got.data_ptr() == staging.data_ptr() and torch.equal(got, blocks)
    assert_whole(store)


def test_partial_chains(store):
    hashes, blocks = chain("part", 8), random_blocks(8, S, seed=4)
    before = store.stats().blocks_used

    async def body(transport):
        assert await transport.put_blocks(store.address, SMALL, hashes[:5], blocks[:5]) == 5
        leading = await transport.get_blocks(store.address, SMALL, hashes)  # 5 present, then a gap
        headless = await transport.get_blocks(store.address, SMALL, [b"absent-head....."] + hashes[1:])
        # A writer of the whole chain copies only the 3 new blocks; the 5 present ones are pinned meanwhile.
        mapped = ucx_blocks("put", "mapped")
        assert await transport.put_blocks(store.address, SMALL, hashes, blocks) == 8
        assert ucx_blocks("put", "mapped") - mapped == 3
        whole = await transport.get_blocks(store.address, SMALL, hashes)
        return leading, headless, whole

    leading, headless, whole = run(body)
    assert torch.equal(leading, blocks[:5]) and headless.shape == (0, S) and torch.equal(whole, blocks)
    assert_whole(store, before + 8)


def test_layout_mismatch_is_refused_with_a_clear_message(store):
    hashes, blocks = chain("lay", 3), random_blocks(3, S, seed=5)
    run(lambda t: t.put_blocks(store.address, SMALL, hashes, blocks))

    with pytest.raises(KVLayoutMismatchError) as held_elsewhere:  # same blocks, another model's layout
        run(lambda t: t.get_blocks(store.address, OTHER_MODEL, hashes))
    message = str(held_elsewhere.value)
    assert "KV layout mismatch" in message and "fp-small" in message and "fp-other" in message

    with pytest.raises(KVLayoutMismatchError, match="do not match the KV layout"):  # rows of the wrong size
        run(lambda t: t.put_blocks(store.address, LLAMA3_8B, chain("lay-big", 3), blocks))

    broken = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float13")
    with pytest.raises(KVLayoutMismatchError, match="unusable KV layout"):
        run(lambda t: t.get_blocks(store.address, broken, hashes))
    assert_whole(store)


def scribble(store_address: str, worker_address: bytes, remote_addr: int, rkey: bytes, nbytes: int) -> None:
    """Overwrites store memory the way a stale or misdirected writer would: through its own UCX endpoint."""
    async def go():
        copier = UcxBlockCopier()
        try:
            garbage = torch.full((1, nbytes), 0x5A, dtype=torch.uint8)
            await copier.write(store_address, worker_address, garbage, [SlotRef(0, remote_addr, rkey)],
                               time.monotonic() + 5)
        finally:
            await copier.close()

    asyncio.run(go())


def test_checksum_catches_a_block_overwritten_in_the_store(store):
    hashes, blocks = chain("crc", 4), random_blocks(4, S, seed=6)
    run(lambda t: t.put_blocks(store.address, SMALL, hashes, blocks))
    pinned = store.stub.Pin(kv_store_pb2.PinRequest(layout=SMALL, block_hashes=common_pb2.BlockHashes(
        hashes=hashes[2:3])), timeout=5)
    store.stub.Release(kv_store_pb2.ReleaseRequest(pin_id=pinned.pin_id), timeout=5)
    assert list(pinned.has_crc32) == [True]
    [remote_addr], [rkey] = pinned.locations.remote_addrs, pinned.locations.rkeys
    scribble(store.address, pinned.endpoint.worker_address, remote_addr + 100, rkey, 64)

    with pytest.raises(KVTransferError, match=f"block {hashes[2].hex()} is corrupt"):
        run(lambda t: t.get_blocks(store.address, SMALL, hashes))
    # The reader had the store drop the corrupt block: nobody reads it again, and the next writer replaces it.
    unchecked = run(lambda t: t.get_blocks(store.address, SMALL, hashes), checksum=False)
    assert unchecked.shape[0] == 2 and torch.equal(unchecked, blocks[:2])
    run(lambda t: t.put_blocks(store.address, SMALL, hashes, blocks))
    assert torch.equal(run(lambda t: t.get_blocks(store.address, SMALL, hashes)), blocks)
    assert_whole(store)


def test_store_refuses_a_torn_write_and_keeps_nothing_of_it(store, monkeypatch):
    hashes, blocks = chain("torn", 6), random_blocks(6, S, seed=7)
    before = store.stats()
    real_write = UcxBlockCopier.write

    async def torn_write(self, store_address, worker_address, rows, slots, deadline):
        counts = await real_write(self, store_address, worker_address, rows, slots, deadline)
        # Half of the fourth block never arrives: its slot keeps what the copier left there before.
        half = torch.zeros((1, S // 2), dtype=torch.uint8)
        await real_write(self, store_address, worker_address, half,
                         [SlotRef(0, slots[3].remote_addr + S // 2, slots[3].rkey)], deadline)
        return counts

    monkeypatch.setattr(UcxBlockCopier, "write", torn_write)
    with pytest.raises(KVTransferError, match=f"block {hashes[3].hex()} arrived torn"):
        run(lambda t: t.put_blocks(store.address, SMALL, hashes, blocks))
    assert stored_count(store, SMALL, hashes) == 0  # the whole write is dropped, not only the torn block
    assert store.metrics()[("splitserve_kv_store_checksum_failures_total", None)] >= 1
    assert_whole(store, before.blocks_used)


def test_a_tcp_only_ucx_client_moves_blocks_by_rma(store):
    """Between hosts there is no shared mapping; UCX_TLS=tcp on the client makes this host look like that."""
    hashes, blocks = chain("rma", 40), random_blocks(40, S, seed=8)
    rma_before = ucx_blocks("put", "rma") + ucx_blocks("get", "rma")

    async def body(transport):
        await transport.put_blocks(store.address, SMALL, hashes, blocks)
        return await transport.get_blocks(store.address, SMALL, hashes)

    got = run(body, ucx_config={"TLS": "tcp"})
    assert torch.equal(got, blocks)
    assert ucx_blocks("put", "rma") + ucx_blocks("get", "rma") == rma_before + 80
    assert_whole(store)


def test_grpc_clients_and_grpc_only_stores_interoperate(store, start_store):
    hashes, blocks = chain("interop", 3), random_blocks(3, S, seed=9)

    async def grpc_client(transport):
        await transport.put_blocks(store.address, SMALL, hashes, blocks)
        return await transport.get_blocks(store.address, SMALL, hashes)

    async def grpc_body():
        transport = GrpcKVTransport(checksum=True)
        try:
            return await grpc_client(transport)
        finally:
            await transport.close()

    assert torch.equal(asyncio.run(grpc_body()), blocks)  # the UCX store still serves PutBlocks/GetBlocks
    assert torch.equal(run(lambda t: t.get_blocks(store.address, SMALL, hashes)), blocks)  # UCX reads them

    grpc_store = start_store("--kv-transport", "grpc", "--capacity-bytes", str(8 << 20))
    fallbacks = KV_TRANSPORT_FALLBACKS.labels("store_without_ucx")._value.get()
    got = run(lambda t: _put_get(t, grpc_store.address, hashes, blocks))
    assert torch.equal(got, blocks)
    assert KV_TRANSPORT_FALLBACKS.labels("store_without_ucx")._value.get() == fallbacks + 2  # counted, per call
    assert_whole(store)
    assert_whole(grpc_store, 3)


async def _put_get(transport, address, hashes, blocks):
    await transport.put_blocks(address, SMALL, hashes, blocks)
    return await transport.get_blocks(address, SMALL, hashes)


def test_an_unreachable_store_is_a_transfer_error():
    started = time.monotonic()
    with pytest.raises(KVTransferError, match="UNAVAILABLE"):
        run(lambda t: t.get_blocks("127.0.0.1:1", SMALL, chain("x", 1), timeout_s=3))
    assert time.monotonic() - started < 5


def test_the_address_of_registered_memory_is_what_the_slot_view_writes(store):
    """Guards the ctypes binding: a Registration's memoryview and address are the same bytes."""
    context = ucx_rma.new_context()
    registration = ucx_rma.Registration(context, 1 << 20)
    try:
        registration.memoryview()[:4] = b"abcd"
        assert ctypes.string_at(registration.address, 4) == b"abcd" and registration.packed_rkey
    finally:
        registration.close()


def test_a_slab_ucx_cannot_allocate_is_private_memory_registered_for_rma(monkeypatch):
    from splitserve.services.kv_store import metrics
    from splitserve.services.kv_store.ucx_data_plane import UcxDataPlane

    real = ucx_rma.Registration

    def no_shared_memory(context, length, address=None):
        if address is None:
            raise ucx_rma.UcxError("allocating", -4)
        return real(context, length, address)

    monkeypatch.setattr(ucx_rma, "Registration", no_shared_memory)
    before = metrics.SLABS.labels("private")._value.get()
    slab = UcxDataPlane().allocate_slab(1 << 20)
    slab.memory[:3] = b"abc"
    assert ctypes.string_at(slab.address, 3) == b"abc" and slab.rkey
    assert metrics.SLABS.labels("private")._value.get() == before + 1
