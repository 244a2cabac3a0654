"""The kv-store as a real `splitserve kv-store` process, driven through GrpcKVTransport and raw gRPC stubs."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.kv_transfer.grpc_transport import GrpcKVTransport
from splitserve.kv_transfer.transport import KVLayoutMismatchError, KVTransferError
from splitserve.launcher.ports import free_ports
from splitserve.launcher.probe import check_grpc
from splitserve.v1 import common_pb2, kv_store_pb2
from splitserve.serving.errors import param_from_error
from splitserve.services.kv_store import server as kv_store_server
from store_process import StoreProcess, chain, random_blocks

SERVICE = "splitserve.v1.KVStore"
SMALL = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="float32",
                            model_fingerprint="fp-small")
S = 2 * 2 * 16 * 2 * 64 * 4  # 32 KiB
LARGE = common_pb2.KVLayout(num_layers=10, block_size=16, num_kv_heads=8, head_dim=128, dtype="float32",
                            model_fingerprint="fp-large")
L = 2 * 10 * 16 * 8 * 128 * 4  # 1.25 MiB: more than one 1 MiB piece


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    process = StoreProcess(tmp_path_factory.mktemp("kv-store"), "--capacity-bytes", str(64 << 20),
                           "--kv-transport", "grpc")
    try:
        yield process
    finally:
        process.stop()


def with_transport(body):
    async def run():
        transport = GrpcKVTransport()
        try:
            return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(run())


def test_an_unavailable_kv_transport_is_a_clear_startup_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        kv_store_server.main(["--kv-transport", "rdma"])
    assert exit_info.value.code == 2
    assert "kv_transport 'rdma' is not available; this build supports ucx, tcp, grpc" in capsys.readouterr().err


def test_health_is_serving(store):
    check_grpc(store.address, service="")
    check_grpc(store.address, service=SERVICE)


def test_blocks_round_trip_byte_identical(store):
    hashes, blocks = chain("rt", 8), random_blocks(8, S, seed=1)

    async def body(transport):
        assert await transport.put_blocks(store.address, SMALL, hashes, blocks, request_id="req-1") == 8
        assert await transport.put_blocks(store.address, SMALL, hashes, blocks) == 8  # present: a no-op
        return await transport.get_blocks(store.address, SMALL, hashes, request_id="req-1")

    got = with_transport(body)
    assert got.dtype == torch.uint8 and torch.equal(got, blocks)


def test_blocks_larger_than_a_piece_are_split_and_reassembled(store):
    hashes, blocks = chain("large", 3), random_blocks(3, L, seed=2)

    async def body(transport):
        assert await transport.put_blocks(store.address, LARGE, hashes, blocks) == 3
        return await transport.get_blocks(store.address, LARGE, hashes)

    assert torch.equal(with_transport(body), blocks)
    pieces = list(store.stub.GetBlocks(kv_store_pb2.GetBlocksRequest(
        layout=LARGE, block_hashes=common_pb2.BlockHashes(hashes=hashes[:1])), timeout=10))
    assert [(p.offset, p.last, p.HasField("layout")) for p in pieces] == [(0, False, True), (1 << 20, True, False)]
    assert b"".join(p.data for p in pieces) == blocks[0].numpy().tobytes()


def test_get_returns_the_leading_run_of_a_partly_present_chain(store):
    hashes, blocks = chain("partial", 4), random_blocks(4, S, seed=3)

    async def body(transport):
        await transport.put_blocks(store.address, SMALL, [hashes[0], hashes[1], hashes[3]], blocks[[0, 1, 3]])
        run = await transport.get_blocks(store.address, SMALL, hashes)
        none = await transport.get_blocks(store.address, SMALL, hashes[2:])
        return run, none

    run, none = with_transport(body)
    assert torch.equal(run, blocks[:2])
    assert none.shape == (0, S)
    lookup = store.stub.Lookup(kv_store_pb2.LookupRequest(layout=SMALL, block_hashes=common_pb2.BlockHashes(
        hashes=hashes)), timeout=5)
    assert list(lookup.present) == [True, True, False, True] and lookup.prefix_blocks == 2


def test_layout_mismatch_is_an_error_not_garbage(store):
    hashes, blocks = chain("mismatch", 2), random_blocks(2, S, seed=4)
    as_fp16 = common_pb2.KVLayout()
    as_fp16.CopyFrom(SMALL)
    as_fp16.dtype = "float16"

    async def body(transport):
        await transport.put_blocks(store.address, SMALL, hashes, blocks)
        with pytest.raises(KVLayoutMismatchError, match="held as .*float32.* requested as .*float16"):
            await transport.get_blocks(store.address, as_fp16, hashes)
        with pytest.raises(KVLayoutMismatchError, match=f"{S // 2} bytes per block"):  # caught before sending
            await transport.put_blocks(store.address, as_fp16, chain("other", 2), blocks)

    with_transport(body)
    # The store refuses a wrong-sized payload itself, naming the layout as the culprit.
    wrong = kv_store_pb2.BlockChunk(block_hash=b"w" * 16, layout=SMALL, offset=0, data=b"x" * (S - 1), last=True)
    with pytest.raises(grpc.RpcError) as err:
        store.stub.PutBlocks(iter([wrong]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and param_from_error(err.value) == "layout"
    assert f"needs {S}" in err.value.details()


def test_a_torn_put_leaves_no_half_written_block(store):
    [done, torn] = chain("torn", 2)
    before = store.stats().bytes_used
    whole = kv_store_pb2.BlockChunk(block_hash=done, layout=SMALL, offset=0, data=b"a" * S, last=True)
    half = kv_store_pb2.BlockChunk(block_hash=torn, layout=SMALL, offset=0, data=b"b" * (S // 2))

    with pytest.raises(grpc.RpcError) as err:  # the client ends the stream inside a block
        store.stub.PutBlocks(iter([whole, half]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended inside block" in err.value.details()

    sent, hold = threading.Event(), threading.Event()

    def stalls_mid_block():
        yield half
        sent.set()
        hold.wait(10)

    call = store.stub.PutBlocks.future(stalls_mid_block(), timeout=10)  # the client goes away mid-block
    assert sent.wait(5)
    time.sleep(0.2)
    call.cancel()
    hold.set()
    lookup = kv_store_pb2.LookupRequest(layout=SMALL, block_hashes=common_pb2.BlockHashes(hashes=[done, torn]))
    assert list(store.stub.Lookup(lookup, timeout=5).present) == [True, False]
    deadline = time.monotonic() + 5
    while store.stats().bytes_used != before + S and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.stats().bytes_used == before + S  # the torn block's slot went back


def test_control_plane_reserve_pin_release(store):
    hashes = chain("ctl", 2)
    with_transport(lambda t: t.put_blocks(store.address, SMALL, hashes[:1], random_blocks(1, S, seed=5)))
    blocks = common_pb2.BlockHashes(hashes=hashes)
    reserved = store.stub.Reserve(kv_store_pb2.ReserveRequest(request_id="r", layout=SMALL, block_hashes=blocks),
                                  timeout=5)
    assert reserved.endpoint.transport == "grpc" and reserved.block_bytes == S
    assert list(reserved.already_present) == [True, False] and not reserved.HasField("slots")
    released = store.stub.Release(kv_store_pb2.ReleaseRequest(pin_id=reserved.reservation_id), timeout=5)
    assert released.released_blocks == 2
    pinned = store.stub.Pin(kv_store_pb2.PinRequest(request_id="p", layout=SMALL, block_hashes=blocks), timeout=5)
    assert list(pinned.pinned) == [True, False] and len(pinned.has_crc32) == 2 and pinned.block_bytes == S
    assert store.stats().pinned_blocks >= 1
    assert store.stub.Release(kv_store_pb2.ReleaseRequest(pin_id=pinned.pin_id), timeout=5).released_blocks == 1
    with pytest.raises(grpc.RpcError) as err:
        store.stub.Commit(kv_store_pb2.CommitRequest(reservation_id=reserved.reservation_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_unreachable_store_is_a_transfer_error():
    [port] = free_ports(1)

    async def body(transport):
        with pytest.raises(KVTransferError, match=f"127.0.0.1:{port}.*UNAVAILABLE"):
            await transport.get_blocks(f"127.0.0.1:{port}", SMALL, chain("x", 1), timeout_s=2)

    with_transport(body)


def test_capacity_eviction_and_metrics(start_store):
    store = start_store("--capacity-bytes", str(4 * S))
    hashes, blocks = chain("evict", 6), random_blocks(6, S, seed=6)

    async def body(transport):
        assert await transport.put_blocks(store.address, SMALL, hashes, blocks) == 6
        assert (await transport.get_blocks(store.address, SMALL, hashes)).shape[0] == 0  # 0 and 1 evicted
        assert torch.equal(await transport.get_blocks(store.address, SMALL, hashes[2:]), blocks[2:])
        # Everything pinned: a new block cannot make room.
        store.stub.Pin(kv_store_pb2.PinRequest(layout=SMALL, block_hashes=common_pb2.BlockHashes(
            hashes=hashes[2:])), timeout=5)
        with pytest.raises(KVTransferError, match="RESOURCE_EXHAUSTED.*pinned or reserved"):
            await transport.put_blocks(store.address, SMALL, chain("more", 1), blocks[:1])

    with_transport(body)
    stats = store.stats()
    assert (stats.blocks_used, stats.blocks_capacity) == (4, 4)
    assert (stats.bytes_used, stats.bytes_capacity) == (4 * S, 4 * S)
    assert (stats.evictions, stats.pinned_blocks, stats.hits, stats.misses) == (2, 4, 4 + 4, 6)
    metrics = store.metrics()
    assert metrics[("splitserve_kv_store_blocks", None)] == 4
    assert metrics[("splitserve_kv_store_bytes", None)] == 4 * S
    assert metrics[("splitserve_kv_store_capacity_bytes", None)] == 4 * S
    assert metrics[("splitserve_kv_store_evictions_total", None)] == 2
    assert metrics[("splitserve_kv_store_hits_total", None)] == 8
    assert metrics[("splitserve_kv_store_misses_total", None)] == 6
    assert metrics[("splitserve_kv_store_transfer_bytes_total", "in")] == 6 * S  # the refused put wrote nothing
    assert metrics[("splitserve_kv_store_transfer_bytes_total", "out")] == 4 * S
    assert metrics[("splitserve_kv_store_transfer_failures_total", "in")] == 1
    assert metrics[("splitserve_kv_store_transfer_seconds_total", "out")] > 0


def test_sigterm_lets_a_running_get_finish_refuses_puts_and_exits_zero(start_store):
    store = start_store("--capacity-bytes", str(64 << 20))
    hashes, blocks = chain("drain", 16), random_blocks(16, L, seed=7)
    with_transport(lambda t: t.put_blocks(store.address, LARGE, hashes, blocks))
    stream = store.stub.GetBlocks(kv_store_pb2.GetBlocksRequest(
        layout=LARGE, block_hashes=common_pb2.BlockHashes(hashes=hashes), max_chunk_bytes=64 << 10), timeout=30)
    first = next(stream)
    store.proc.send_signal(signal.SIGTERM)
    health = health_pb2_grpc.HealthStub(store.channel)
    deadline = time.monotonic() + 5
    while health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline
        time.sleep(0.05)

    async def refused(transport):
        with pytest.raises(KVTransferError, match="UNAVAILABLE.*draining"):
            await transport.put_blocks(store.address, LARGE, chain("late", 1), blocks[:1])

    with_transport(refused)
    assert store.proc.poll() is None  # still serving the get
    received = first.data + b"".join(chunk.data for chunk in stream)
    assert received == blocks.numpy().tobytes()
    assert store.proc.wait(timeout=15) == 0
    assert "waiting for 1 block transfers to finish" in store.log()
