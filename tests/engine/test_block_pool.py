"""BlockPool and KVCacheManager alone: ref counts, reuse order, LRU eviction, prefix admission."""

import pytest

from splitserve.engine.block_pool import BlockPool, NoFreeBlocksError
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.sequence import Sequence
from splitserve.kv_blocks.hashing import chain_block_hashes, extend_block_hashes
from splitserve.sampling_params import SamplingParams


def test_allocate_release_and_exhaustion():
    pool = BlockPool(3)
    blocks = [pool.allocate() for _ in range(3)]
    assert sorted(blocks) == [0, 1, 2] and pool.num_free == 0
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()
    pool.release(blocks[1])
    assert pool.num_free == 1 and pool.allocate() == blocks[1]
    with pytest.raises(RuntimeError):
        pool.release(blocks[0]); pool.release(blocks[0])  # noqa: E702


def test_uncached_blocks_are_reused_before_cached_ones_and_lru_evicts_oldest():
    pool = BlockPool(3)
    a, b, c = (pool.allocate() for _ in range(3))
    pool.register(a, b"A" * 16)
    pool.register(b, b"B" * 16)
    pool.release(a)
    pool.release(b)
    pool.release(c)
    assert pool.allocate() == c  # nothing cached in c: taken before evicting anything
    assert pool.num_evictions == 0
    assert pool.allocate() == a and pool.lookup(b"A" * 16) is None  # a freed first: evicted first
    assert pool.lookup(b"B" * 16) == b and pool.num_evictions == 1


def test_touch_revives_cached_block():
    pool = BlockPool(2)
    a = pool.allocate()
    pool.register(a, b"H" * 16)
    pool.release(a)
    assert pool.num_free == 2
    pool.touch(pool.lookup(b"H" * 16))
    assert pool.ref_count(a) == 1 and pool.num_free == 1


def test_hash_chain_depends_on_every_earlier_token_and_model():
    tokens = list(range(40))
    hashes = chain_block_hashes(tokens, 16, "m")
    assert len(hashes) == 2
    changed = chain_block_hashes([99] + tokens[1:], 16, "m")
    assert changed[0] != hashes[0] and changed[1] != hashes[1]
    assert chain_block_hashes(tokens, 16, "other") != hashes
    assert extend_block_hashes(hashes[:1], tokens, 16, "m") == hashes


def test_admission_reuses_prefix_but_leaves_last_token():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, 4, "m", enable_prefix_caching=True)
    first = Sequence("a", 0, list(range(8)), SamplingParams(), 0.0)
    assert kv.admit_cached_prefix(first) == 0
    assert kv.allocate(first, 8)
    first.num_computed_tokens = 8
    kv.commit_computed(first)
    same = Sequence("b", 0, list(range(8)), SamplingParams(), 0.0)
    assert kv.admit_cached_prefix(same) == 4  # both blocks cached, but the last token must be recomputed
    assert same.block_ids == first.block_ids[:1] and pool.ref_count(first.block_ids[0]) == 2
    kv.free(first)
    kv.free(same)
    assert pool.num_free == 8


def test_prefix_cache_changes_are_kept_in_order_only_when_recorded():
    """KV events: what became findable and what stopped being so, in order (drained once per step)."""
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"A" * 16)
    assert pool.changes.drain() == []                  # nobody publishes: nothing kept
    pool.changes.record()
    pool.register(b, b"B" * 16)
    pool.release(a)
    pool.release(b)
    c = pool.allocate()                                # evicts A, the least recently freed
    pool.register(c, b"C" * 16)
    pool.register(c, b"C" * 16)                        # already findable: no second event
    assert pool.changes.drain() == [(True, b"B" * 16), (False, b"A" * 16), (True, b"C" * 16)]
    pool.reset_prefix_cache()
    assert pool.changes.drain() == [(False, b"B" * 16)]
