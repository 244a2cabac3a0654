"""Prompts that together exceed the KV cache: every request still finishes, in arrival order where possible,
with the output it has alone — offline, and on a decode engine whose requests come with prompt blocks to load."""

from __future__ import annotations

import asyncio
import random

import pytest

from splitserve import LLM, SamplingParams
from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.kv_connector import KVLoad

VOCAB = 1000
NUM_BLOCKS = 60            # 960 tokens: room for about two of the requests below at once
PROMPT_LENS = [300, 330, 310, 360, 320, 350, 340, 305]
PARAMS = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
MAX_STEPS = 5000           # far more than the work needs (~8 * 120 decode steps); a livelock runs into it


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, VOCAB) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def references(llama_ckpt):
    """Each request alone on an engine with room to spare."""
    llm = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=256)
    return [llm.generate([p], PARAMS)[0].outputs[0].token_ids for p in _prompts()]


def _engine(ckpt, num_blocks):
    return LLM(str(ckpt), dtype="float32", device="cpu", num_kv_blocks=num_blocks).engine


def _drive(engine) -> list:
    finished, steps_without_work = [], 0
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished_requests():
            return finished
        steps_before = engine.num_steps
        finished += engine.step()
        # A waiting request owns no cache blocks, received ones included: only running ones hold memory.
        assert all(not seq.block_ids for seq in engine.scheduler.waiting)
        steps_without_work = 0 if engine.num_steps > steps_before else steps_without_work + 1
        assert steps_without_work < 3, f"the engine schedules nothing with work queued: {engine.stats()}"
    raise AssertionError(f"not finished after {MAX_STEPS} steps: {engine.stats()}")


def _assert_pool_whole(engine):
    stats = engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"] and stats["running"] == stats["waiting"] == 0, stats


def test_offline_requests_beyond_the_cache_all_finish_in_order(llama_ckpt, references):
    engine = _engine(llama_ckpt, NUM_BLOCKS)
    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"r{i}", prompt, PARAMS)
    finished = _drive(engine)
    assert [o.request_id for o in finished] == [f"r{i}" for i in range(len(PROMPT_LENS))]
    for out in finished:
        assert out.outputs[0].token_ids == references[int(out.request_id[1:])], out.request_id
    assert engine.stats()["preemptions"] > 0  # the scenario did put the cache under pressure
    _assert_pool_whole(engine)


def _exports(llama_ckpt):
    """First token and exported prompt blocks of every prompt, from a prefill engine."""
    prefill = _engine(llama_ckpt, 256)
    exports = []
    for i, prompt in enumerate(_prompts()):
        prefill.add_request(f"p{i}", prompt, PARAMS.replace(max_tokens=1), export_kv=True)
        [out] = _drive(prefill)
        exports.append((out.outputs[0].token_ids[0], out.kv_export))
    return exports


def test_decode_with_received_blocks_beyond_the_cache_all_finish(llama_ckpt, references):
    """Received blocks are loaded at admission into blocks allocated then: waiting requests hold nothing, so none
    blocks another, and each load that ran saved its prompt's computation."""
    decode = _engine(llama_ckpt, NUM_BLOCKS)
    outcomes = []
    for i, (prompt, (first, export)) in enumerate(zip(_prompts(), _exports(llama_ckpt))):
        decode.add_request(f"d{i}", prompt, PARAMS, produced_token_ids=[first],
                           kv_load=KVLoad(export.block_hashes, export.blocks, outcomes.append))
    assert decode.stats()["free_blocks"] == NUM_BLOCKS  # nothing is taken before admission
    finished = _drive(decode)
    assert [o.request_id for o in finished] == [f"d{i}" for i in range(len(PROMPT_LENS))]
    for out in finished:
        assert out.outputs[0].token_ids == references[int(out.request_id[1:])], out.request_id
    stats = decode.stats()
    assert outcomes == [None] * len(PROMPT_LENS) and stats["kv_load_failures"] == 0
    assert stats["preemptions"] > 0  # under pressure; preempted ones recompute what was evicted meanwhile
    # Every prompt's full blocks were loaded, not computed, at least the first time round.
    tails = sum(n % 16 for n in PROMPT_LENS)
    assert stats["prompt_tokens_computed"] <= tails + stats["preemptions"] * max(PROMPT_LENS)
    _assert_pool_whole(decode)


def test_async_engine_streams_each_token_once_under_pressure(llama_ckpt, references):
    """A step that schedules nothing must not post the previous step's tokens again."""
    decode = _engine(llama_ckpt, NUM_BLOCKS)
    exports = _exports(llama_ckpt)

    async def main():
        engine = AsyncEngine(decode)
        engine.start()

        async def one(i, prompt, first, export):
            tokens = []
            async for delta in engine.generate(f"a{i}", prompt, PARAMS, produced_token_ids=[first],
                                               kv_blocks=(export.block_hashes, export.blocks)):
                tokens += delta.token_ids
                assert len(tokens) <= PARAMS.max_tokens, f"a{i} streamed more tokens than max_tokens"
                if delta.finished:
                    assert delta.finish_reason == "length"
            return tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*(
                one(i, p, first, export) for i, (p, (first, export)) in enumerate(zip(_prompts(), exports)))), 300)
        finally:
            await engine.stop()

    outputs = asyncio.run(main())
    for i, tokens in enumerate(outputs):
        # The stream carries only decode's tokens after the first (which came from prefill).
        assert [exports[i][0]] + tokens == references[i], i
    _assert_pool_whole(decode)


def test_a_sequence_longer_than_the_whole_cache_ends_at_the_cache(llama_ckpt):
    """Preempting a sequence that fills the cache alone would only restart it: it ends with "length" instead."""
    engine = _engine(llama_ckpt, 4)  # 64 tokens
    assert engine.max_model_len == 64
    engine.add_request("long", _prompts()[0][:40], PARAMS)
    [out] = _drive(engine)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 64 - 40
    _assert_pool_whole(engine)

