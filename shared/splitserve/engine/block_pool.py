"""Physical KV blocks: reference counts, a free list, and the hash -> block map that makes prefix caching work.

Only this class touches reference counts. Freed blocks that hold a registered (full, hashed) prefix stay
findable until their memory is needed, and are reclaimed least-recently-freed first; blocks with nothing
cached are reused before any cached block is evicted.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Optional

from splitserve.kv_blocks.hashing import BlockHash
from splitserve.kv_events.change_log import ChangeLog


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._hash_of: list[Optional[BlockHash]] = [None] * num_blocks
        self._block_of_hash: dict[BlockHash, int] = {}
        self._free_uncached: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.num_evictions = 0
        self.changes = ChangeLog()  # for KV events, when a worker publishes them

    @property
    def num_free(self) -> int:
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._block_of_hash)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self) -> int:
        if self._free_uncached:
            block_id = self._free_uncached.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget_hash(block_id)
            self.num_evictions += 1
        else:
            raise NoFreeBlocksError("KV cache is full")
        self._ref_counts[block_id] = 1
        return block_id

    def lookup(self, block_hash: BlockHash) -> Optional[int]:
        return self._block_of_hash.get(block_hash)

    def touch(self, block_id: int) -> None:
        """Takes a reference on a cached block found by lookup(), pulling it out of the eviction queue."""
        if self._ref_counts[block_id] == 0:
            self._evictable.pop(block_id, None)
        self._ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        count = self._ref_counts[block_id]
        if count <= 0:
            raise RuntimeError(f"block {block_id} released more often than it was taken")
        self._ref_counts[block_id] = count - 1
        if count == 1:
            if self._hash_of[block_id] is not None:
                self._evictable[block_id] = None
            else:
                self._free_uncached.append(block_id)

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Makes a full, computed block findable by its hash; a duplicate of an already cached block stays private."""
        if self._hash_of[block_id] is not None or block_hash in self._block_of_hash:
            return
        self._hash_of[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id
        self.changes.stored((block_hash,))

    def reset_prefix_cache(self) -> None:
        """Drops every cached hash that no running sequence holds (e.g. after weights change)."""
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._forget_hash(block_id)
            self._free_uncached.append(block_id)

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self._hash_of[block_id]
        if block_hash is not None:
            self._hash_of[block_id] = None
            del self._block_of_hash[block_hash]
            self.changes.removed((block_hash,))
