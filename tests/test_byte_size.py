"""Memory settings in the units people write, and a clear error for anything else."""

import pytest

from splitserve.byte_size import ByteSize, format_bytes, parse_byte_size


@pytest.mark.parametrize("text, expected", [
    ("1073741824", 2**30), ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("512 mib", 512 * 2**20),
    ("1.5GB", 1_500_000_000), ("64KiB", 65536), ("100B", 100), ("0.5TiB", 2**39),
    # One letter as vLLM's --kv-cache-memory-bytes reads it: lower case decimal, upper case binary.
    ("4G", 4 * 2**30), ("4g", 4 * 10**9), ("2k", 2000), ("2K", 2048),
])
def test_sizes_parse_with_their_units(text, expected):
    assert parse_byte_size(text) == expected == ByteSize(text)


@pytest.mark.parametrize("bad", ["", "2XB", "GiB", "-1", "2 GiB extra", "1e9", True])
def test_anything_else_is_refused_with_what_to_write(bad):
    with pytest.raises(ValueError, match="not a size in bytes: write e.g. 2GiB"):
        parse_byte_size(bad)


def test_a_byte_size_is_an_int_that_survives_a_round_trip_through_a_flag():
    size = ByteSize("2GiB")
    assert isinstance(size, int) and ByteSize(str(size)) == size == 2 * 2**30


def test_sizes_format_for_logs():
    assert [format_bytes(n) for n in (512, 2048, 3 * 2**20, 2 * 2**30)] == ["512 B", "2.0 KiB", "3.0 MiB", "2.0 GiB"]
