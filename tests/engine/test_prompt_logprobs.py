"""Prompt logprobs (SamplingParams.prompt_logprobs) equal transformers' log_softmax over the whole prompt, whatever
the prefix cache holds and however prefill is chunked."""

from __future__ import annotations

import pytest
import torch

from hf_reference import hf_logprobs, mixed_prompts
from splitserve import LLM, InvalidRequestError, SamplingParams
from splitserve.kv_blocks.hashing import chain_block_hashes

VOCAB = 1000
# float32 on both sides, different matmul shapes: 1e-4 nats is far below any gap between tokens that matters.
TOL = 1e-4


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    # A 32-token step budget: a 90-token prompt is prefilled in three chunks.
    return LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=128, block_size=16,
               max_num_batched_tokens=32, enable_chunked_prefill=True)


def _check(path, prompt: list[int], entries, k: int) -> None:
    reference = hf_logprobs(path, prompt[:1], prompt[1:])   # row i: the distribution of prompt token i + 1
    assert entries[0] is None
    assert len(entries) == len(prompt)
    for i, (token, entry) in enumerate(zip(prompt[1:], entries[1:])):
        assert entry[token] == pytest.approx(reference[i, token].item(), abs=TOL)
        top = torch.topk(reference[i], k)
        assert set(entry) - {token} <= set(top.indices.tolist())
        assert len(entry) in (k, k + 1)
        for tid, value in zip(top.indices.tolist(), top.values.tolist()):
            assert entry[tid] == pytest.approx(value, abs=TOL)


def test_prompt_logprobs_match_transformers_across_chunks_and_a_cached_prefix(llm, llama_ckpt):
    engine = llm.engine
    short, long = mixed_prompts(VOCAB, [7, 90], seed=5)
    # Put the long prompt's blocks in the prefix cache first: the request for its logprobs must not skip them.
    llm.generate([long], SamplingParams(max_tokens=1, temperature=0.0))
    assert engine.num_cached_prefix_blocks(_hashes(engine, long)) == 5
    before = engine.stats()["prompt_tokens_computed"]
    outs = llm.generate([long, short], [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3),
                                        SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=0)])
    assert engine.stats()["prompt_tokens_computed"] - before == len(long) + len(short)
    _check(str(llama_ckpt), long, outs[0].prompt_logprobs, 3)
    _check(str(llama_ckpt), short, outs[1].prompt_logprobs, 0)
    assert outs[0].num_cached_tokens == 0
    # The generated tokens are the same as without prompt logprobs.
    plain = llm.generate([long], SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert plain.outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert plain.prompt_logprobs is None
    assert plain.num_cached_tokens > 0


def test_prompt_logprobs_of_a_one_token_prompt_and_limits(llm):
    out = llm.generate([[42]], SamplingParams(max_tokens=1, prompt_logprobs=5))[0]
    assert out.prompt_logprobs == [None]
    with pytest.raises(InvalidRequestError) as exc:
        llm.generate([[1, 2]], SamplingParams(prompt_logprobs=VOCAB + 1))
    assert exc.value.param == "prompt_logprobs"
    with pytest.raises(InvalidRequestError):
        SamplingParams(prompt_logprobs=-1)


def test_a_continued_sequence_computes_no_prompt_logprobs(llm):
    """The worker that sampled the first token returned them; decode continuing it uses the prefix cache."""
    engine = llm.engine
    prompt = mixed_prompts(VOCAB, [40], seed=9)[0]
    engine.add_request("continued", prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2),
                       produced_token_ids=[7])
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[0].prompt_logprobs is None


def _hashes(engine, prompt):
    size = engine.config.block_size
    return chain_block_hashes(prompt[: len(prompt) // size * size], size, engine.model_id)
