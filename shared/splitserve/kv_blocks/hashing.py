"""Names a KV block the same way everywhere: the engines' prefix caches and the kv-store.

A block's hash covers its parent's hash, its token ids and the model's identity, so two blocks with equal hashes
hold the same KV for the same model whatever request produced them. SHA-256 (truncated to 16 bytes) rather than
Python's hash(): the value must agree across processes and machines.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

BlockHash = bytes
ROOT_HASH: BlockHash = b"\x00" * 16


def hash_block(parent: BlockHash, token_ids: Sequence[int], model_id: str) -> BlockHash:
    digest = hashlib.sha256()
    digest.update(parent)
    digest.update(model_id.encode("utf-8"))
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()[:16]


def chain_block_hashes(
    token_ids: Sequence[int], block_size: int, model_id: str, parent: BlockHash = ROOT_HASH
) -> list[BlockHash]:
    """Hashes of every FULL block of `token_ids`; a trailing partial block has no hash yet."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], model_id)
        hashes.append(parent)
    return hashes


def extend_block_hashes(
    hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, model_id: str
) -> list[BlockHash]:
    """Appends hashes for blocks that became full since `hashes` was computed (decode grows a sequence)."""
    start = len(hashes) * block_size
    parent = hashes[-1] if hashes else ROOT_HASH
    hashes.extend(chain_block_hashes(token_ids[start:], block_size, model_id, parent))
    return hashes


def hex_hashes(hashes: Iterable[BlockHash]) -> list[str]:
    return [h.hex() for h in hashes]
