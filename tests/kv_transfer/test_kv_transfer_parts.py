"""The transport-independent parts of moving KV blocks: checksums, receive buffers, run coalescing, naming."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from ucx_required import require_ucx

from splitserve.kv_blocks.checksum import (ChecksumMismatchError, crc32, enabled_from_env, row_crc32s,
                                             verify_rows)
from splitserve.kv_transfer.host_buffers import MIN_MAPPED_BYTES, ReceiveBuffers
from splitserve.kv_transfer.store_client import check_out
from splitserve.serving.engine_worker import make_transport


def test_checksums_are_zlib_crc32_of_each_row():
    rows = torch.randint(0, 256, (3, 1000), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert row_crc32s(rows) == [zlib.crc32(rows[i].numpy().tobytes()) for i in range(3)]
    assert crc32(memoryview(rows[1].numpy())) == row_crc32s(rows)[1]


def test_verify_names_the_corrupt_block_and_refuses_unverifiable_ones():
    rows = torch.zeros((2, 64), dtype=torch.uint8)
    good = row_crc32s(rows)
    verify_rows(rows, good, [b"a" * 16, b"b" * 16])
    rows[1, 7] = 1
    with pytest.raises(ChecksumMismatchError, match=f"block {(b'b' * 16).hex()} is corrupt"):
        verify_rows(rows, good, [b"a" * 16, b"b" * 16])
    with pytest.raises(ChecksumMismatchError, match="has no checksum"):
        verify_rows(rows[:1], [None], [b"a" * 16])


def test_checksum_switch_flag_over_env(monkeypatch):
    monkeypatch.delenv("SPLITSERVE_KV_CHECKSUM", raising=False)
    assert enabled_from_env() is False
    monkeypatch.setenv("SPLITSERVE_KV_CHECKSUM", "1")
    assert enabled_from_env() is True and enabled_from_env(False) is False
    monkeypatch.setenv("SPLITSERVE_KV_CHECKSUM", "maybe")
    with pytest.raises(ValueError, match="SPLITSERVE_KV_CHECKSUM"):
        enabled_from_env()


@pytest.mark.parametrize("rows,row_bytes", [(4, 1024), (5, MIN_MAPPED_BYTES // 4 + 3)])
def test_receive_buffers_are_writable_rows_that_own_their_memory(rows, row_bytes):
    buffer = ReceiveBuffers().rows(rows, row_bytes)
    assert buffer.shape == (rows, row_bytes) and buffer.dtype == torch.uint8 and buffer.is_contiguous()
    buffer[-1, -1] = 7
    view = buffer[1:]
    del buffer  # the view keeps the mapping alive
    assert int(view[-1, -1]) == 7


def test_receive_buffers_are_reused_only_once_nothing_refers_to_them():
    pool, row = ReceiveBuffers(max_idle_bytes=8 * MIN_MAPPED_BYTES), MIN_MAPPED_BYTES // 4
    first = pool.rows(8, row)
    address = first.data_ptr()
    view, array = first[2:], first.numpy()
    del first
    assert pool.rows(8, row).data_ptr() != address  # a view and a numpy array still use it
    del view
    assert pool.rows(8, row).data_ptr() != address
    del array
    again = pool.rows(5, row)  # a smaller request fits in it
    assert again.data_ptr() == address and again.shape == (5, row)


def test_a_callers_buffer_must_fit():
    staging = torch.empty((4, 100), dtype=torch.uint8)
    assert check_out(staging, 3, 120).shape == (3, 120)  # any contiguous buffer with room, reshaped
    with pytest.raises(ValueError, match="at least 5 x 100"):
        check_out(staging, 5, 100)
    with pytest.raises(ValueError, match="contiguous uint8 CPU"):
        check_out(staging.t(), 1, 10)


def test_transports_by_name():
    assert make_transport("tcp").name == make_transport("grpc").name == "grpc"
    with pytest.raises(ValueError, match="available: ucx, tcp, grpc"):
        make_transport("rdma")


def test_ucx_copies_coalesce_adjacent_slots_of_one_slab():
    require_ucx()
    from splitserve.kv_transfer.ucx_copier import SlotRef, _runs

    slots = [SlotRef(0, 1000, b"k"), SlotRef(1, 1100, b"k"), SlotRef(2, 1200, b"k"),  # one run
             SlotRef(3, 1400, b"k"),  # a gap in the slab
             SlotRef(4, 1500, b"other"),  # another slab
             SlotRef(6, 1600, b"other")]  # a gap in the rows
    assert list(_runs(slots, 100)) == [(0, 3, 1000, b"k"), (3, 1, 1400, b"k"), (4, 1, 1500, b"other"),
                                       (6, 1, 1600, b"other")]


def test_a_slot_table_finds_the_same_runs_as_slot_refs():
    """Reserve/Pin answers become SlotTables (arrays, vectorised runs): the runs a block-by-block walk finds,
    and the same rows and keys as SlotRefs."""
    require_ucx()
    import numpy as np

    from splitserve.kv_transfer.ucx_copier import SlotRef, _runs
    from splitserve.kv_transfer.ucx_transport import _slot_table
    from splitserve.kv_transfer.transport import KVTransferError
    from splitserve.v1 import kv_store_pb2

    rng = random.Random(0)
    for _ in range(300):
        count, address, addresses, keys = rng.randint(0, 24), 4096, [], []
        for _ in range(count):
            address += 100 * rng.choice([1, 1, 1, 2, 5])
            addresses.append(address)
            keys.append(rng.choice([0, 0, 0, 1]))
        answer = kv_store_pb2.SlotAddresses(remote_addrs=addresses, rkey_index=keys, rkeys=[b"k", b"other"])
        wanted = np.array([rng.random() < 0.8 for _ in range(count)], dtype=bool)
        table = _slot_table("store", answer, count).select(wanted)
        refs = [SlotRef(i, addresses[i], [b"k", b"other"][keys[i]]) for i in range(count) if wanted[i]]
        assert list(_runs(table, 100)) == reference_runs(refs, 100)
        assert list(table) == refs and table[:2].rows.tolist() == [r.row for r in refs[:2]]
    with pytest.raises(KVTransferError, match="malformed slot addresses"):
        _slot_table("store", kv_store_pb2.SlotAddresses(remote_addrs=[1, 2], rkey_index=[0, 1], rkeys=[b"k"]), 2)


def reference_runs(slots, row_bytes: int) -> list[tuple[int, int, int, bytes]]:
    """Runs found block by block: the plain definition the vectorised SlotTable.runs must agree with."""
    runs: list[list] = []
    for slot in slots:
        run = runs[-1] if runs else None
        if (run is not None and slot.row == run[0] + run[1] and slot.rkey == run[3]
                and slot.remote_addr == run[2] + run[1] * row_bytes):
            run[1] += 1
        else:
            runs.append([slot.row, 1, slot.remote_addr, slot.rkey])
    return [tuple(run) for run in runs]
