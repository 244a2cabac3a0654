"""The kv-store's control plane: what Reserve, Commit, Pin and Release cost for one transfer's block hashes.

The calls are made as UcxKVTransport makes them (put = Reserve + Commit, get = Pin(leading_run) + Release), for
the shapes of benchmarks/kv_transfer.py: 2000 blocks of 32 KiB, where this cost decides the transfer rate, and
100 blocks of 2 MiB. Every repetition writes new hashes into a store sized for two rounds, so once warm each
Reserve evicts the oldest round, as in a running server. Two columns per call:
  grpc    the blocking stub's call into a real `splitserve kv-store --kv-transport ucx` process on 127.0.0.1:
          client serialisation, loopback, the server's work, parsing the answer;
  server  what that process does for it, measured in this one: the servicer's method on a store of the same
          kind (slabs with an rkey, so slot addresses go out), plus parsing the request and serialising the
          answer, which gRPC runs in Python around it.
Rows "... crc32" repeat Commit and Pin with a writer's checksum per block (sent with Commit, kept, returned);
"Stats" is a call that names no block: what any call costs.
Medians of the timed repetitions after warm-ups, in ms per call and µs per block.

`.venv/bin/python benchmarks/kv_store_control.py [--quick] [--profile]`: --quick (fewer repetitions) takes
about 10 s here; --profile adds where the server's time goes (cProfile, 32 KiB blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import grpc
from google.protobuf.internal import api_implementation

from kv_transfer import BlockShape, shapes, start_store, stop
from splitserve.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from splitserve.services.kv_store.block_store import BlockStore
from splitserve.services.kv_store.servicer import KVStoreServicer
from splitserve.services.kv_store.slot_pool import Slab, anonymous_slab

LEASE_MS = 60_000
FLOOR = "Stats (names no block)"
CALLS = ("Reserve", "Commit", "Pin", "Release")
ROWS = ("Reserve", "Commit", "Pin", "Release", "put = Reserve + Commit", "get = Pin + Release",
        "Commit with crc32", "Pin of blocks with crc32", FLOOR)


class _Context:
    """What the servicer asks of a gRPC context; an abort here is a bug (in this benchmark or the store)."""

    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")

    def set_trailing_metadata(self, metadata):
        pass


def _slab_with_rkey(nbytes: int) -> Slab:
    """A private slab that looks registered (an rkey of a UCX-typical size), so Reserve/Pin hand out addresses."""
    slab = anonymous_slab(nbytes)
    return Slab(slab.memory, slab.address, rkey=b"\x5a" * 120, owner=slab.owner)


class InProcessStore:
    """The servicer on its own store in this process; each call is timed from request bytes to answer bytes."""

    def __init__(self, capacity: int):
        store = BlockStore(capacity, LEASE_MS / 1000, allocate_slab=_slab_with_rkey)
        endpoint = kv_store_pb2.DataPlaneEndpoint(transport="ucx", worker_address=b"\x01" * 400)
        self.servicer = KVStoreServicer(store, is_draining=lambda: False, endpoint=endpoint)
        self.profile: Optional[cProfile.Profile] = None

    async def call(self, name: str, request):
        wire = request.SerializeToString()
        method = getattr(self.servicer, name)
        if self.profile:
            self.profile.enable()
        started = time.perf_counter()
        response = await method(type(request).FromString(wire), _Context())
        response.SerializeToString()
        seconds = time.perf_counter() - started
        if self.profile:
            self.profile.disable()
        return response, seconds


class ProcessStore:
    """A real kv-store process, called through the blocking stub."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address)
        self.stub = kv_store_pb2_grpc.KVStoreStub(self.channel)

    async def call(self, name: str, request):
        started = time.perf_counter()
        response = getattr(self.stub, name)(request, timeout=30)
        return response, time.perf_counter() - started


async def one_round(store, shape: BlockShape, checksums: bool) -> dict[str, float]:
    """put then get of `shape.count` new hashes; seconds per call. Raises if the store answers wrongly."""
    hashes = [random.randbytes(16) for _ in range(shape.count)]
    block_hashes = common_pb2.BlockHashes(hashes=hashes)
    crc32s = [random.getrandbits(32) for _ in hashes] if checksums else None
    seconds = {}
    reserved, seconds["Reserve"] = await store.call("Reserve", kv_store_pb2.ReserveRequest(
        request_id="bench", layout=shape.layout, block_hashes=block_hashes, lease_ms=LEASE_MS))
    committed, seconds["Commit"] = await store.call("Commit", kv_store_pb2.CommitRequest(
        reservation_id=reserved.reservation_id, block_hashes=block_hashes, block_crc32=crc32s))
    pinned, seconds["Pin"] = await store.call("Pin", kv_store_pb2.PinRequest(
        request_id="bench", layout=shape.layout, block_hashes=block_hashes, lease_ms=LEASE_MS, leading_run=True))
    released, seconds["Release"] = await store.call("Release", kv_store_pb2.ReleaseRequest(pin_id=pinned.pin_id))
    _, seconds["Stats"] = await store.call("Stats", kv_store_pb2.KVStoreStatsRequest())
    count = shape.count
    if (any(reserved.already_present) or len(reserved.slots.remote_addrs) != count
            or not all(reserved.slots.remote_addrs) or committed.committed_blocks != count
            or not all(pinned.pinned) or len(pinned.locations.remote_addrs) != count
            or list(pinned.has_crc32) != [checksums] * count or (checksums and list(pinned.crc32) != crc32s)
            or released.released_blocks != count):
        raise RuntimeError(f"the store answered a put/get of {count} new blocks wrongly")
    return seconds


async def measure(store, shape: BlockShape, warmup: int, timed: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {row: [] for row in ROWS}
    for checksums in (False, True):
        for rep in range(warmup + timed):
            seconds = await one_round(store, shape, checksums)
            if rep < warmup:
                continue
            if checksums:
                times["Commit with crc32"].append(seconds["Commit"])
                times["Pin of blocks with crc32"].append(seconds["Pin"])
                continue
            for name in CALLS:
                times[name].append(seconds[name])
            times["put = Reserve + Commit"].append(seconds["Reserve"] + seconds["Commit"])
            times["get = Pin + Release"].append(seconds["Pin"] + seconds["Release"])
            times[FLOOR].append(seconds["Stats"])
    return times


def capacity(shape: BlockShape) -> int:
    return 2 * shape.total + shape.size  # two rounds: once warm, each Reserve evicts the oldest


def print_table(shape: BlockShape, over_grpc: dict[str, list[float]], server: dict[str, list[float]]) -> None:
    print(f"\n{shape.count} hashes, blocks of {shape.name}")
    print(f"  {'call':26s} {'grpc ms':>9s} {'µs/block':>9s} {'server ms':>10s} {'µs/block':>9s}")
    for row in ROWS:
        a, b = statistics.median(over_grpc[row]), statistics.median(server[row])
        per_block = (f"{a * 1e6 / shape.count:9.2f}", f"{b * 1e6 / shape.count:9.2f}") if row != FLOOR else ("-",) * 2
        print(f"  {row:26s} {a * 1e3:9.2f} {per_block[0]:>9s} {b * 1e3:10.2f} {per_block[1]:>9s}")


def print_profile(profile: cProfile.Profile, calls: int) -> None:
    print(f"\nserver profile, 32 KiB blocks: {calls} rounds of Reserve, Commit, Pin, Release (by own time)")
    pstats.Stats(profile, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions: well under a minute")
    ap.add_argument("--profile", action="store_true", help="also profile the server's calls (32 KiB blocks)")
    args = ap.parse_args()
    warmup, timed = (3, 15) if args.quick else (5, 51)
    started = time.monotonic()
    print(f"kv-store control plane: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, protobuf "
          f"{api_implementation.Type()}; medians of {timed} runs after {warmup} warm-ups")
    by_size = sorted(shapes(quick=False), key=lambda shape: shape.size)
    with tempfile.TemporaryDirectory(prefix="kv-store-control-") as log_dir:
        for shape in by_size:
            proc, address = start_store(capacity(shape), Path(log_dir))
            try:
                process = ProcessStore(address)
                over_grpc = asyncio.run(measure(process, shape, warmup, timed))
                process.channel.close()
            finally:
                stop(proc)
            server = asyncio.run(measure(InProcessStore(capacity(shape)), shape, warmup, timed))
            print_table(shape, over_grpc, server)
    if args.profile:
        shape = by_size[0]
        store = InProcessStore(capacity(shape))
        asyncio.run(measure(store, shape, warmup, 0))
        store.profile = cProfile.Profile()
        asyncio.run(measure(store, shape, 0, timed))
        print_profile(store.profile, 2 * timed)
    print(f"\n(elapsed {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
