"""A block whose bytes do not match its checksum, in a store that does not verify commits: the first reader to
find it has the store drop it, so the next writer stores it afresh and later readers get good KV (first writer
wins otherwise, and every request with that prefix would recompute until the block was evicted)."""

from __future__ import annotations

import asyncio

import pytest
from ucx_required import require_ucx

from splitserve.kv_transfer import grpc_transport
from splitserve.kv_transfer.grpc_transport import GrpcKVTransport
from splitserve.kv_transfer.transport import KVChecksumError
from splitserve.v1 import common_pb2
from store_process import chain, random_blocks

LAYOUT = common_pb2.KVLayout(num_layers=4, block_size=16, num_kv_heads=4, head_dim=64, dtype="float16",
                             model_fingerprint="fp-corrupt")
SIZE = 2 * 4 * 16 * 4 * 64 * 2  # 64 KiB


def _transport(kind: str):
    if kind == "grpc":
        return GrpcKVTransport(checksum=True), grpc_transport, "row_crc32s"
    require_ucx()
    from splitserve.kv_transfer import ucx_transport

    return ucx_transport.UcxKVTransport(checksum=True), ucx_transport, "payload_crc32s"


@pytest.mark.parametrize("kind,read", [("grpc", "get_blocks"), ("ucx", "get_blocks"),
                                       ("ucx", "pinned_blocks")])
def test_a_corrupt_block_is_dropped_and_the_next_writer_replaces_it(start_store, monkeypatch, kind, read):
    store = start_store("--kv-transport", "grpc" if kind == "grpc" else "ucx", "--capacity-bytes", str(16 << 20))
    hashes, blocks = chain("corrupt", 4), random_blocks(4, SIZE, seed=9)
    transport, module, crc_function = _transport(kind)
    honest = getattr(module, crc_function)

    def torn(*args):  # the writer's checksum of block 2 is of other bytes than the ones that arrived
        computed = honest(*args)

        def flip(values):
            values = list(values)
            values[2] ^= 1
            return values

        if asyncio.iscoroutine(computed):
            async def later():
                return flip(await computed)
            return later()
        return flip(computed)

    async def get():
        if read == "get_blocks":
            return await transport.get_blocks(store.address, LAYOUT, hashes)
        async with transport.pinned_blocks(store.address, LAYOUT, hashes) as received:
            return received.rows()

    async def body():
        try:
            monkeypatch.setattr(module, crc_function, torn)
            assert await transport.put_blocks(store.address, LAYOUT, hashes, blocks) == 4
            monkeypatch.setattr(module, crc_function, honest)
            with pytest.raises(KVChecksumError, match=f"block {hashes[2].hex()} is corrupt"):
                await get()
            await asyncio.sleep(0.3)  # the pin's Release goes in the background
            stats = store.stats()
            assert stats.blocks_used == 3 and stats.pinned_blocks == 0
            assert await transport.put_blocks(store.address, LAYOUT, hashes, blocks) == 4  # block 2 written again
            assert (await get()).equal(blocks)
        finally:
            await transport.close()

    asyncio.run(body())
    assert store.metrics()[("splitserve_kv_store_discarded_blocks_total", None)] == 1
