"""Blocks that never stop at a staging buffer: prefill's lent cache blocks are gathered straight into the
store's mapped slots, and decode reads the slots where they lie, under the store's pin.

Real `splitserve kv-store --kv-transport ucx --kv-checksum` process (the module's store); checksums on.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from ucx_required import require_ucx

require_ucx()

from splitserve.engine.block_io import CacheBlocks, export_blocks  # noqa: E402
from splitserve.engine.kv_connector import KVLoadError  # noqa: E402
from splitserve.kv_transfer.transport import KVTransferError  # noqa: E402
from splitserve.v1 import common_pb2, kv_store_pb2  # noqa: E402
from store_process import chain  # noqa: E402
from test_ucx_data_plane import SMALL, S, assert_whole, run, scribble, store, ucx_blocks  # noqa: E402,F401


def small_caches(num_blocks: int = 24, seed: int = 0) -> list[torch.Tensor]:
    """Two layers of an engine's paged cache in SMALL's layout: [2 (K, V), blocks, 16 tokens, 2 heads, 64]."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((2, num_blocks, 16, 2, 64), generator=generator) for _ in range(2)]


def pinned_blocks(store) -> int:
    return store.stats().pinned_blocks


async def _pin_and_leave(transport, address, hashes):
    async with transport.pinned_blocks(address, SMALL, hashes):
        pass


def test_lent_blocks_go_straight_into_mapped_slots_and_are_read_in_place(store):
    caches = small_caches(seed=1)
    block_ids = [7, 3, 11, 12, 13, 0]  # scattered and adjacent ids alike
    lent = CacheBlocks(caches, block_ids)
    expected = export_blocks(caches, block_ids)
    assert lent.shape == (6, S)
    hashes = chain("inplace", 6)
    mapped_put = ucx_blocks("put", "mapped")

    async def body(transport):
        # The store verifies each slot's crc32 on commit against the one computed over the cache in place.
        assert await transport.put_blocks(store.address, SMALL, hashes, lent, request_id="req-inplace") == 6
        async with transport.pinned_blocks(store.address, SMALL, hashes + chain("absent", 1)) as received:
            assert received.mapped and received.count == 6 and received.nbytes == 6 * S
            assert pinned_blocks(store) == 6  # held for the body of the `async with`
            got = []
            received.read(lambda runs: got.extend(view.clone() for _, view in runs))
            assert sum(view.shape[0] for view in got) == 6
            assert received.in_time()
        deadline = time.monotonic() + 5
        while pinned_blocks(store) and time.monotonic() < deadline:  # the pin ends in the background
            await asyncio.sleep(0.02)
        assert pinned_blocks(store) == 0
        with pytest.raises(KVLoadError, match="given back before they were read"):
            received.read(lambda runs: None)
        return torch.cat(got)

    assert torch.equal(run(body), expected)
    assert ucx_blocks("put", "mapped") == mapped_put + 6
    assert_whole(store)


def test_a_pin_ends_with_its_body_whether_or_not_the_rows_were_read(store):
    caches = small_caches(seed=2)
    hashes = chain("unread", 3)

    async def body(transport):
        await transport.put_blocks(store.address, SMALL, hashes, CacheBlocks(caches, [1, 2, 3]))
        with pytest.raises(RuntimeError, match="the request ended first"):
            async with transport.pinned_blocks(store.address, SMALL, hashes) as received:
                assert pinned_blocks(store) == 3
                raise RuntimeError("the request ended first")
        deadline = time.monotonic() + 5
        while pinned_blocks(store) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert pinned_blocks(store) == 0
        with pytest.raises(KVLoadError):
            received.read(lambda runs: None)
        # A body cancelled while it holds the pin ends it too, and close() does not wait for its deadline.
        entered = asyncio.Event()

        async def held_forever():
            async with transport.pinned_blocks(store.address, SMALL, hashes):
                entered.set()
                await asyncio.sleep(3600)

        task = asyncio.ensure_future(held_forever())
        await entered.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    started = time.monotonic()
    run(body)
    assert time.monotonic() - started < 10
    assert_whole(store)


def test_a_corrupt_slot_is_caught_before_anyone_reads_it_in_place(store):
    caches = small_caches(seed=3)
    hashes = chain("inplace-crc", 4)
    run(lambda t: t.put_blocks(store.address, SMALL, hashes, CacheBlocks(caches, [4, 5, 6, 7])))
    pinned = store.stub.Pin(kv_store_pb2.PinRequest(layout=SMALL, block_hashes=common_pb2.BlockHashes(
        hashes=hashes[1:2])), timeout=5)
    store.stub.Release(kv_store_pb2.ReleaseRequest(pin_id=pinned.pin_id), timeout=5)
    [remote_addr], [rkey] = pinned.locations.remote_addrs, pinned.locations.rkeys
    scribble(store.address, pinned.endpoint.worker_address, remote_addr + 8, rkey, 16)

    with pytest.raises(KVTransferError, match=f"block {hashes[1].hex()} is corrupt"):
        run(lambda t: _pin_and_leave(t, store.address, hashes))
    assert_whole(store)


def test_without_a_mapping_lent_blocks_are_staged_for_rma_and_reads_are_staged(store):
    """UCX_TLS=tcp on the client: no shared mapping, as between two hosts."""
    caches = small_caches(seed=4)
    block_ids = [9, 2, 3, 4]
    hashes = chain("inplace-rma", 4)
    rma_before = ucx_blocks("put", "rma") + ucx_blocks("get", "rma")

    async def body(transport):
        await transport.put_blocks(store.address, SMALL, hashes, CacheBlocks(caches, block_ids))
        async with transport.pinned_blocks(store.address, SMALL, hashes) as received:
            assert not received.mapped and received.count == 4
            return received.rows()

    assert torch.equal(run(body, ucx_config={"TLS": "tcp"}), export_blocks(caches, block_ids))
    assert ucx_blocks("put", "rma") + ucx_blocks("get", "rma") == rma_before + 8
    assert_whole(store)
