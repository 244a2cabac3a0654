"""KVLoads alone (the engine's port for received KV): which received rows a sequence can load at admission, into
which blocks, and that each load reports its end exactly once."""

import pytest
import torch

from splitserve.engine.block_pool import BlockPool
from splitserve.engine.kv_cache_manager import KVCacheManager
from splitserve.engine.kv_connector import KVLoad, KVLoadError, KVLoads
from splitserve.engine.sequence import Sequence
from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.sampling_params import SamplingParams

BLOCK = 4
PROMPT = list(range(10, 30))  # 5 full blocks: the last one holds the last token, so at most 4 are loadable


def _rows(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.uint8).reshape(n, 1)


def _admit(loads: KVLoads, kv: KVCacheManager, seq: Sequence) -> int:
    """What the scheduler does at admission, up to the allocation."""
    kv.admit_cached_prefix(seq)
    loaded = loads.tokens_to_load(seq)
    seq.num_computed_tokens += loaded
    assert kv.allocate(seq, seq.num_uncomputed_tokens)
    loads.schedule(seq, loaded)
    return loaded


def _cache_prefix(kv: KVCacheManager, blocks: int) -> None:
    """Another sequence computed the prompt's first `blocks` blocks here (then finished)."""
    done = Sequence("earlier", 0, PROMPT[: blocks * BLOCK] + [0], SamplingParams(), 0.0)
    kv.admit_cached_prefix(done)
    kv.allocate(done, blocks * BLOCK)
    done.num_computed_tokens = blocks * BLOCK
    kv.commit_computed(done)
    kv.free(done)


@pytest.mark.parametrize("run_from,cached,expected_rows", [
    (0, 0, [0, 1, 2, 3]),   # the whole prompt's run, nothing here: every loadable block
    (0, 2, [2, 3]),         # blocks cached here are not loaded again
    (2, 2, [0, 1]),         # a run that starts where the local hit ends (a worker pulled what it lacked)
    (2, 3, [1]),            # ... or before it
    (3, 1, None),           # a gap between the hit and the run: nothing to load
])
def test_the_rows_loaded_are_the_prompts_own_after_the_local_hit(run_from, cached, expected_rows):
    kv = KVCacheManager(BlockPool(16), BLOCK, "m", enable_prefix_caching=True)
    _cache_prefix(kv, cached)
    hashes = chain_block_hashes(PROMPT, BLOCK, "m")[run_from:]
    loads, outcomes, written = KVLoads(BLOCK), [], []
    seq = Sequence("r", 0, PROMPT, SamplingParams(), 0.0)
    loads.add(seq, KVLoad(hashes, _rows(len(hashes)), outcomes.append))
    loaded = _admit(loads, kv, seq)
    assert loaded == len(expected_rows or []) * BLOCK
    assert loads.load(lambda block_ids, rows, runs: written.append((block_ids, rows))) == []
    # A gap (blocks cached when the rows were pulled, evicted since) is a failed load: counted, and said why.
    assert outcomes == ([None] if expected_rows else ["blocks before the received ones are no longer cached here"])
    assert loads.num_failures == (0 if expected_rows else 1)
    if expected_rows is None:
        assert written == []
    else:
        first = cached if cached >= run_from else run_from
        assert written == [(seq.block_ids[first: first + len(expected_rows)], expected_rows)]


def test_rows_for_another_prompt_or_model_are_never_loaded():
    kv = KVCacheManager(BlockPool(16), BLOCK, "m", enable_prefix_caching=False)
    loads, outcomes = KVLoads(BLOCK), []
    seq = Sequence("r", 0, PROMPT, SamplingParams(), 0.0)
    loads.add(seq, KVLoad(chain_block_hashes(PROMPT, BLOCK, "another model"), _rows(5), outcomes.append))
    assert _admit(loads, kv, seq) == 0 and outcomes == [None]
    # A run that names this prompt only for its first blocks loads only those.
    seq = Sequence("s", 0, PROMPT, SamplingParams(), 0.0)
    hashes = chain_block_hashes(PROMPT[:8] + [1] * 12, BLOCK, "m")
    loads.add(seq, KVLoad(hashes, _rows(5)))
    assert _admit(loads, kv, seq) == 2 * BLOCK


def test_a_failed_load_is_reported_with_its_tokens_and_an_ended_request_lets_go():
    kv = KVCacheManager(BlockPool(16), BLOCK, "m", enable_prefix_caching=True)
    loads, outcomes = KVLoads(BLOCK), []
    seq = Sequence("r", 0, PROMPT, SamplingParams(), 0.0)
    loads.add(seq, KVLoad(chain_block_hashes(PROMPT, BLOCK, "m"), _rows(5), outcomes.append))
    _admit(loads, kv, seq)

    def torn(block_ids, rows, runs):
        raise KVLoadError("torn")

    assert loads.load(torn) == [(seq, 4 * BLOCK)]
    assert outcomes == ["torn"] and loads.num_failures == 1
    assert loads.load(torn) == []  # a load runs once

    ended, gone = [], Sequence("gone", 0, PROMPT, SamplingParams(), 0.0)
    loads.add(gone, KVLoad(chain_block_hashes(PROMPT, BLOCK, "m"), _rows(5), ended.append))
    loads.finish(gone)
    loads.finish(gone)
    assert ended == [None]
