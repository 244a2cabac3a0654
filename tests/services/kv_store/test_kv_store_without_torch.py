"""The kv-store only moves bytes: its process must not load torch (a second of start-up and ~1 GiB of address
space per store, and an engine dependency the store has no use for)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from splitserve.kv_transfer.grpc_transport import GrpcKVTransport
from splitserve.v1 import common_pb2
from store_process import StoreProcess, chain, random_blocks

LAYOUT = common_pb2.KVLayout(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64, dtype="bfloat16",
                             model_fingerprint="fp-no-torch")
BLOCK_BYTES = 2 * 2 * 16 * 2 * 64 * 2


def test_the_kv_store_modules_import_without_torch():
    code = ("import sys, splitserve.services.kv_store.server, splitserve.services.kv_store.ucx_data_plane; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('splitserve'))")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_serving_kv_store_process_has_not_loaded_torch(tmp_path):
    store = StoreProcess(tmp_path, "--kv-transport", "grpc", "--capacity-bytes", str(8 << 20), "--kv-checksum")
    try:
        hashes, blocks = chain("no-torch", 2), random_blocks(2, BLOCK_BYTES, seed=3)

        async def round_trip():  # puts and gets exercise the store's layout sizing and its checksum path
            transport = GrpcKVTransport(checksum=True)
            try:
                await transport.put_blocks(store.address, LAYOUT, hashes, blocks)
                return await transport.get_blocks(store.address, LAYOUT, hashes)
            finally:
                await transport.close()

        assert asyncio.run(round_trip()).equal(blocks)
        with open(f"/proc/{store.proc.pid}/maps") as maps:
            loaded = {line.split()[-1] for line in maps if "/" in line}
        assert not [path for path in loaded if "libtorch" in path or "/torch/" in path]
    finally:
        store.stop()
