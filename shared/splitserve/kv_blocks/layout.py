"""What a block of KV is, byte for byte: travels with every handoff so mismatches fail loudly.

The dtype is a name ("bfloat16"), not a torch dtype, so processes that only move bytes (the kv-store) size
blocks the same way the engine does without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# Element sizes of the dtypes a KV cache can hold, by torch's name for them.
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
               "int8": 1, "uint8": 1}


class UnknownDTypeError(ValueError):
    """A layout names a dtype no KV cache here can hold."""


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # a torch dtype's name; a torch.dtype given here is stored by name

    def __post_init__(self) -> None:
        name = str(self.dtype).removeprefix("torch.")
        if name not in DTYPE_BYTES:
            raise UnknownDTypeError(f"unknown KV dtype {name!r} (known: {', '.join(DTYPE_BYTES)})")
        object.__setattr__(self, "dtype", name)

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer: [num_layers, 2, block_size, num_kv_heads, head_dim] elements."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]
