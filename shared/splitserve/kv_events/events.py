"""The events, named as vLLM names them (BlockStored, BlockRemoved, AllBlocksCleared) so the concepts map one to
one, and their wire form for the index's apply script.

The wire form is one byte string of 17-byte records (an op byte and a 16-byte block hash), in event order: a Lua
script walks it with string.sub, which costs far less than decoding JSON or msgpack per block, and order matters
(a block removed and stored again in one step must end up stored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from splitserve.kv_blocks.hashing import BlockHash

MEDIUM_DEVICE = "device"          # an engine's paged cache (prefill or decode worker)
MEDIUM_HOST_STORE = "host-store"  # the kv-store's host memory
HASH_BYTES = 16
OP_STORED, OP_REMOVED, OP_CLEARED = b"S", b"R", b"C"


@dataclass(frozen=True)
class BlockStored:
    """Blocks became findable by hash. parent_block_hash is None where the producer does not track it (the
    engine's pool): the index keys by hash alone, and a hash already covers its parent."""
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: Optional[BlockHash]
    token_count: Optional[int]      # tokens per block (only full blocks are hashed); None: the kv-store's mix
    medium: str


@dataclass(frozen=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]
    medium: str


@dataclass(frozen=True)
class AllBlocksCleared:
    medium: str


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


def events_from_pool(changes: Sequence[tuple[bool, BlockHash]], block_size: Optional[int],
                     medium: str = MEDIUM_DEVICE) -> list[KVEvent]:
    """A block pool's ordered (stored?, hash) changes as events, consecutive ones of a kind in one event."""
    events: list[KVEvent] = []
    run: list[BlockHash] = []
    for i, (stored, block_hash) in enumerate(changes):
        run.append(block_hash)
        if i + 1 == len(changes) or changes[i + 1][0] != stored:
            hashes = tuple(run)
            events.append(BlockStored(hashes, None, block_size, medium) if stored else BlockRemoved(hashes, medium))
            run = []
    return events


def encode_ops(events: Iterable[KVEvent]) -> bytes:
    """The wire form; ValueError for a hash that is not 16 bytes (it could never match a lookup)."""
    out = bytearray()
    for event in events:
        if isinstance(event, AllBlocksCleared):
            out += OP_CLEARED + bytes(HASH_BYTES)
            continue
        op = OP_STORED if isinstance(event, BlockStored) else OP_REMOVED
        for block_hash in event.block_hashes:
            if len(block_hash) != HASH_BYTES:
                raise ValueError(f"block hashes are {HASH_BYTES} bytes, got {len(block_hash)}")
            out += op + block_hash
    return bytes(out)


def apply_to(held: set[BlockHash], events: Iterable[KVEvent]) -> None:
    """What a publisher's own copy of its set does with events (the snapshot it resyncs from)."""
    for event in events:
        if isinstance(event, AllBlocksCleared):
            held.clear()
        elif isinstance(event, BlockStored):
            held.update(event.block_hashes)
        else:
            held.difference_update(event.block_hashes)
