"""What a block's KV layout means to the store: the key blocks are filed under and the payload size it fixes.

The payload format (K then V per layer, [block_size, num_kv_heads, head_dim] of dtype) is the contract in
kv_store.proto; its size comes from the KVLayout the engines use (splitserve.kv_blocks), so the store and the
engines cannot disagree.
"""

from __future__ import annotations

import functools

from splitserve.proto_convert import describe_layout, layout_from_proto
from splitserve.v1 import common_pb2
from splitserve.sampling_params import InvalidRequestError

LayoutKey = tuple[int, int, int, int, str, str]


class LayoutError(InvalidRequestError):
    """A layout the store cannot use, or a payload whose size does not match its layout."""

    def __init__(self, message: str):
        super().__init__(message, "layout")


class LayoutConflictError(LayoutError):
    """A requested block is held, but under another layout: reader and writer disagree about the KV format."""


def layout_key(layout: common_pb2.KVLayout) -> LayoutKey:
    """Every field, the model fingerprint included: equal shapes from different weights are different KV."""
    return (layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim, layout.dtype,
            layout.model_fingerprint)


def layout_of_key(key: LayoutKey) -> common_pb2.KVLayout:
    num_layers, block_size, num_kv_heads, head_dim, dtype, fingerprint = key
    return common_pb2.KVLayout(num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, dtype=dtype, model_fingerprint=fingerprint)


def block_bytes(layout: common_pb2.KVLayout) -> int:
    """Payload size of one block; raises LayoutError for an unknown dtype or a zero dimension."""
    size = _block_bytes(layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim, layout.dtype)
    if size <= 0:
        raise LayoutError(f"KV layout has a zero dimension: {describe_layout(layout)}")
    return size


@functools.lru_cache(maxsize=256)
def _block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str) -> int:
    """Cached: every call to the store names a layout, and a one-block Reserve takes only ~30 µs here."""
    layout = common_pb2.KVLayout(num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, dtype=dtype)
    try:
        return layout_from_proto(layout).bytes_per_block
    except InvalidRequestError as exc:
        raise LayoutError(str(exc)) from exc


def check_payload_size(layout: common_pb2.KVLayout, block_hash: bytes, nbytes: int) -> None:
    expected = block_bytes(layout)
    if nbytes != expected:
        raise LayoutError(f"block {block_hash.hex()} has {nbytes} bytes of payload but its layout "
                          f"({describe_layout(layout)}) needs {expected}")


def conflict(block_hash: bytes, held: LayoutKey, requested: common_pb2.KVLayout) -> LayoutConflictError:
    return LayoutConflictError(f"KV layout mismatch: block {block_hash.hex()} is held as "
                               f"{describe_layout(layout_of_key(held))}, requested as {describe_layout(requested)}")
