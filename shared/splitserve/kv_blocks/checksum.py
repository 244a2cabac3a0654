"""Per-block checksums: a torn or misdirected transfer must surface as an error, never be decoded as KV.

The writer computes zlib's CRC-32 of each block's payload, the store keeps it with the block, and the reader
checks what it received against it (kv_store.proto, "Checksums"). CRC-32 because every Python has it and it
catches what a torn transfer produces (stale bytes from a slot's previous block, a partial write). It costs
about 1 s per GB per core here (docs/kv-transport.md), ~8x the copy itself, hence off by default; zlib drops
the GIL while it runs, so callers hash in a worker thread.

`SPLITSERVE_KV_CHECKSUM=1` turns it on for every transport constructed without an explicit flag, and (same
variable, through its settings) for the kv-store's own verification.
"""

from __future__ import annotations

import os
import zlib
from typing import Optional, Sequence

ENV_VAR = "SPLITSERVE_KV_CHECKSUM"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class ChecksumMismatchError(ValueError):
    """A block's payload does not match the checksum its writer computed (`corrupt_block`: its hash), or the
    block came without one (`corrupt_block` None: nothing is wrong with the bytes, the writer made no checksum)."""

    def __init__(self, message: str, corrupt_block: Optional[bytes] = None):
        super().__init__(message)
        self.corrupt_block = corrupt_block


def enabled_from_env(explicit: Optional[bool] = None) -> bool:
    """The explicit flag if given, else SPLITSERVE_KV_CHECKSUM (unset: off)."""
    if explicit is not None:
        return explicit
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{ENV_VAR}={value!r}: expected one of 1/0, true/false, yes/no, on/off")


def crc32(payload) -> int:
    """CRC-32 of one block's bytes (any buffer: memoryview, bytes, a contiguous numpy array)."""
    return zlib.crc32(payload) & 0xFFFFFFFF


def row_crc32s(rows, count: Optional[int] = None) -> list[int]:
    """CRC-32 of each of the first `count` rows of contiguous uint8 rows `[n, block_bytes]` on the host (a
    numpy array, or a torch tensor: read through .numpy(), so this module needs no torch)."""
    array = _host_array(rows)
    return [crc32(array[i]) for i in range(array.shape[0] if count is None else count)]


def verify_rows(rows, expected: Sequence[Optional[int]], names: Sequence[bytes]) -> None:
    """Raises ChecksumMismatchError naming the first block whose bytes or checksum are off.

    `expected[i]` None means the block came without a checksum: also an error, since the reader asked for
    verified blocks and a silent pass would hide a writer that was configured without checksums.
    """
    array = _host_array(rows)
    for i, (want, name) in enumerate(zip(expected, names)):
        if want is None:
            raise ChecksumMismatchError(
                f"block {name.hex()} has no checksum: its writer computed none (set {ENV_VAR}=1 on writers, "
                f"or run the kv-store with --kv-checksum)")
        got = crc32(array[i])
        if got != want:
            raise ChecksumMismatchError(f"block {name.hex()} is corrupt: crc32 {got:08x} of the received bytes, "
                                        f"{want:08x} when written (torn or overwritten transfer)", name)


def _host_array(rows):
    return rows.numpy() if hasattr(rows, "numpy") else rows
