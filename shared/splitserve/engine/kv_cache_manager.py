"""Per-sequence block lists on top of the BlockPool: prefix-cache admission, growth, registration, freeing."""

from __future__ import annotations

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.sequence import Sequence
from splitserve.kv_blocks.hashing import extend_block_hashes


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, model_id: str, enable_prefix_caching: bool):
        self.pool = pool
        self.block_size = block_size
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    def admit_cached_prefix(self, seq: Sequence) -> int:
        """Gives a waiting sequence the longest run of cached leading blocks; returns how many tokens that covers.

        At least the last token is always left to compute, because its logits pick the next token. A request for
        prompt logprobs gets no hit: cached positions have no logits (engine/prompt_logprobs.py).
        """
        assert not seq.block_ids and seq.num_computed_tokens == 0
        tokens = seq.token_ids
        self._update_hashes(seq, tokens)  # also what received blocks are matched against (kv_connector)
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return 0
        max_blocks = (len(tokens) - 1) // self.block_size
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        for block_id in hits:
            self.pool.touch(block_id)
        seq.block_ids = hits
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def record_prefix_query(self, seq: Sequence, hit_tokens: int) -> None:
        """Counts an admission's lookup once it sticks (a refused admission is retried and must not count twice)."""
        if self.enable_prefix_caching:
            self.prefix_queries_tokens += seq.num_tokens
            self.prefix_hit_tokens += hit_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grows the sequence's block list to hold `num_new_tokens` more tokens; False (and no change) if full."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.pool.num_free:
            return False
        for _ in range(needed):
            seq.block_ids.append(self.pool.allocate())
        return True

    def commit_computed(self, seq: Sequence) -> None:
        """Registers blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full_blocks = seq.num_computed_tokens // self.block_size
        self._update_hashes(seq, seq.token_ids[: full_blocks * self.block_size])
        for i in range(full_blocks):
            self.pool.register(seq.block_ids[i], seq.block_hashes[i])

    def free(self, seq: Sequence) -> None:
        # Tail first: the tail is the least shareable part, so it becomes the first to be evicted.
        for block_id in reversed(seq.block_ids):
            self.pool.release(block_id)
        seq.block_ids = []

    def _update_hashes(self, seq: Sequence, tokens: list[int]) -> None:
        if len(seq.block_hashes) < len(tokens) // self.block_size:
            extend_block_hashes(seq.block_hashes, tokens, self.block_size, self.model_id)
