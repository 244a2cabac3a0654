"""UCX transfers when the kv-store stalls, dies or restarts: a bounded KVTransferError, never a hang, no leaks."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch
from ucx_required import require_ucx

require_ucx()

from splitserve.kv_transfer.transport import KVTransferError  # noqa: E402
from splitserve.kv_transfer.ucx_copier import UcxBlockCopier  # noqa: E402
from splitserve.kv_transfer.ucx_transport import UcxKVTransport  # noqa: E402
from splitserve.v1 import common_pb2  # noqa: E402
from store_process import chain, random_blocks  # noqa: E402

LAYOUT = common_pb2.KVLayout(num_layers=4, block_size=16, num_kv_heads=4, head_dim=64, dtype="float16",
                             model_fingerprint="fp-faults")
SIZE = 2 * 4 * 16 * 4 * 64 * 2  # 64 KiB
UCX_STORE = ("--kv-transport", "ucx", "--kv-checksum", "--capacity-bytes", str(64 << 20))


def run(body, **transport_args):
    async def go():
        transport = UcxKVTransport(checksum=True, **transport_args)
        try:
            return await body(transport)
        finally:
            await transport.close()

    return asyncio.run(go())


async def timed(coro) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await coro
    except BaseException as exc:  # noqa: BLE001  (the test inspects it)
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


async def got_append(results: list, coro):
    results.append(await coro)


def wait_for_no_leases(store, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = store.stats()
        if stats.pinned_blocks == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"kv-store still holds {store.stats().pinned_blocks} pinned blocks")


def test_a_stalled_store_is_a_timeout_not_a_hang(start_store):
    store = start_store(*UCX_STORE)
    hashes, blocks = chain("stall", 8), random_blocks(8, SIZE, seed=1)

    async def body(transport):
        await transport.put_blocks(store.address, LAYOUT, hashes, blocks)
        store.proc.send_signal(signal.SIGSTOP)  # alive but unresponsive: the worst case for a client
        try:
            get = await timed(transport.get_blocks(store.address, LAYOUT, hashes, timeout_s=1.5))
            put = await timed(transport.put_blocks(store.address, LAYOUT, chain("stall-2", 8), blocks,
                                                   timeout_s=1.5))
        finally:
            store.proc.send_signal(signal.SIGCONT)
        assert torch.equal(await transport.get_blocks(store.address, LAYOUT, hashes), blocks)  # usable again
        return get, put

    for elapsed, error in run(body):
        assert isinstance(error, KVTransferError) and "DEADLINE_EXCEEDED" in str(error)
        assert elapsed < 3.0
    wait_for_no_leases(store, 10)  # whatever the stalled calls pinned is released or expires with its lease


@pytest.mark.parametrize("path", ["mapped", "rma"])
@pytest.mark.parametrize("direction", ["put", "get"])
def test_killing_the_store_mid_transfer_fails_fast_and_a_restart_is_used_again(start_store, monkeypatch, direction,
                                                                               path):
    store = start_store(*UCX_STORE)
    hashes, blocks = chain(f"k-{direction}-{path}", 32), random_blocks(32, SIZE, seed=2)
    ucx_config = {"TLS": "tcp"} if path == "rma" else None
    killed = []

    def kill_then(real):
        async def copy(self, *args, **kwargs):
            if not killed:  # the store dies after Reserve/Pin, while the bytes are on their way
                store.kill()
                killed.append(time.monotonic())
            return await real(self, *args, **kwargs)
        return copy

    async def body(transport):
        if direction == "get":
            await transport.put_blocks(store.address, LAYOUT, hashes, blocks)
        monkeypatch.setattr(UcxBlockCopier, "read" if direction == "get" else "write",
                            kill_then(getattr(UcxBlockCopier, "read" if direction == "get" else "write")))
        if direction == "get":
            got = []
            outcome = await timed(got_append(got, transport.get_blocks(store.address, LAYOUT, hashes, timeout_s=10)))
            if path == "mapped" and outcome[1] is None:
                # The pinned slots stay mapped here after the store dies, and nothing can change them any more:
                # the copy completes with the bytes as written. The next transfer notices the dead store.
                assert torch.equal(got[0], blocks)
                outcome = await timed(transport.get_blocks(store.address, LAYOUT, hashes, timeout_s=10))
        else:
            outcome = await timed(transport.put_blocks(store.address, LAYOUT, hashes, blocks, timeout_s=10))
        monkeypatch.undo()
        restarted = start_store(*UCX_STORE, port=store.port)
        assert await transport.put_blocks(restarted.address, LAYOUT, hashes, blocks) == 32
        assert torch.equal(await transport.get_blocks(restarted.address, LAYOUT, hashes), blocks)
        return outcome, restarted

    (elapsed, error), restarted = run(body, ucx_config=ucx_config)
    assert killed and isinstance(error, KVTransferError), error
    assert elapsed < 5.0  # far below the 10 s deadline: a dead store is noticed, not waited out
    stats = restarted.stats()
    assert stats.pinned_blocks == 0 and stats.blocks_used == 32


def test_concurrent_transfers_leak_nothing(start_store):
    store = start_store(*UCX_STORE)
    chains = [(chain(f"c{i}", 6), random_blocks(6, SIZE, seed=100 + i)) for i in range(32)]

    async def body(transport):
        async def one(hashes, blocks):
            await transport.put_blocks(store.address, LAYOUT, hashes, blocks)
            return torch.equal(await transport.get_blocks(store.address, LAYOUT, hashes), blocks)

        return await asyncio.gather(*(one(h, b) for h, b in chains))

    assert all(run(body))
    stats = store.stats()
    assert stats.pinned_blocks == 0 and stats.blocks_used == 32 * 6


def test_sigterm_lets_a_running_ucx_put_commit_then_exits_zero(start_store, monkeypatch):
    store = start_store(*UCX_STORE)
    hashes, blocks = chain("drain", 8), random_blocks(8, SIZE, seed=3)
    real_write = UcxBlockCopier.write

    async def slow_write(self, *args, **kwargs):
        store.proc.send_signal(signal.SIGTERM)  # the store is told to stop while the bytes are on their way
        await asyncio.sleep(1.0)
        return await real_write(self, *args, **kwargs)

    monkeypatch.setattr(UcxBlockCopier, "write", slow_write)
    assert run(lambda t: t.put_blocks(store.address, LAYOUT, hashes, blocks)) == 8
    assert store.proc.wait(timeout=15) == 0
    assert "waiting for 1 UCX transfers to commit or release" in store.log()


async def _pin_and_leave(transport, address, hashes):
    async with transport.pinned_blocks(address, LAYOUT, hashes):
        await asyncio.sleep(0)


@pytest.mark.parametrize("operation", ["get_in_place", "get", "put"])
def test_callers_cancelled_mid_rpc_leave_no_leases(start_store, operation):
    """A caller cancelled while its Pin or Reserve is in flight (a client that disconnected): the store may grant
    the lease anyway, after the caller stopped waiting; it must still end now, not when its lease expires."""
    store = start_store(*UCX_STORE)
    hashes, blocks = chain("cancelled", 6), random_blocks(6, SIZE, seed=5)

    async def body(transport):
        await transport.put_blocks(store.address, LAYOUT, hashes, blocks)
        for attempt in range(40):
            if operation == "get_in_place":
                call = _pin_and_leave(transport, store.address, hashes)
            elif operation == "get":
                call = transport.get_blocks(store.address, LAYOUT, hashes)
            else:  # a reservation pins the blocks already present
                call = transport.put_blocks(store.address, LAYOUT, hashes, blocks)
            task = asyncio.ensure_future(call)
            for _ in range(attempt % 8):  # cancel at several points of the Pin / Reserve round trip
                await asyncio.sleep(0)
            await asyncio.sleep(0.0005 * (attempt // 8))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.5)  # background Releases

    run(body)
    wait_for_no_leases(store, timeout_s=3.0)  # the leases asked for are 30 s + margin
