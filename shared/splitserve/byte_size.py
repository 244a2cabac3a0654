"""Sizes in bytes as people write them (2GiB, 512MiB, 1.5GB, 4G, 1073741824), for the memory settings.

Torch-free: the launcher and the kv-store parse their flags with it too.
"""

from __future__ import annotations

import re
from typing import Union

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# One letter as vLLM reads its --kv-cache-memory-bytes, so its values work here unchanged: k m g t are decimal,
# K M G T binary.
_LETTERS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_byte_size(value: Union[int, str]) -> int:
    """Bytes from an int or a string with an optional unit (B, KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary,
    one letter as vLLM reads it); ValueError saying what is expected otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            number, unit = match.groups()
            scale = _LETTERS.get(unit) or _UNITS.get(unit.lower())
            if scale is not None:
                return int(float(number) * scale)
    raise ValueError(f"{value!r} is not a size in bytes: write e.g. 2GiB, 512MiB, 1.5GB or 1073741824")


class ByteSize(int):
    """An int of bytes that also parses the units above: the type of the memory settings, so a flag, an env
    variable and a Python caller all accept "2GiB"."""

    def __new__(cls, value: Union[int, str]) -> "ByteSize":
        return super().__new__(cls, parse_byte_size(value))


def format_bytes(nbytes: int) -> str:
    """A size for a log line: 2.0 GiB, 256.0 MiB, 512 B."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
