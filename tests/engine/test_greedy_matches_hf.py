"""Greedy generation equals transformers' token for token, under every scheduling mode the engine has."""

from __future__ import annotations

import itertools

import pytest

from hf_reference import hf_greedy, mixed_prompts
from splitserve import LLM, SamplingParams

LENGTHS = [1, 7, 16, 33, 120, 300, 64, 17]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def references(tiny_ckpts):
    """arch -> (prompts, HF greedy outputs)."""
    refs = {}
    for arch, path in tiny_ckpts.items():
        llm_vocab = _vocab_size(path)
        prompts = mixed_prompts(llm_vocab, LENGTHS, seed=sum(map(ord, arch)))  # stable across processes
        refs[arch] = (prompts, [hf_greedy(str(path), p, MAX_TOKENS) for p in prompts])
    return refs


def _vocab_size(path) -> int:
    import json

    return json.loads((path / "config.json").read_text())["vocab_size"]


MODES = list(itertools.product([True, False], [True, False], [False, True]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("prefix_caching,chunked,preempt", MODES,
                         ids=[f"prefix{int(a)}-chunk{int(b)}-preempt{int(c)}" for a, b, c in MODES])
def test_greedy_equals_transformers(arch, prefix_caching, chunked, preempt, tiny_ckpts, references):
    prompts, expected = references[arch]
    llm = LLM(
        str(tiny_ckpts[arch]), dtype="float32", device="cpu", block_size=16,
        # 24 blocks hold the longest request (300 + 64 tokens) but not the batch: preemption must happen.
        num_kv_blocks=24 if preempt else 256,
        max_num_seqs=8, max_num_batched_tokens=48 if chunked else 512,
        enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    # Twice through the same engine: the second pass finds the first one's blocks in the prefix cache.
    for round_ in range(2):
        outputs = llm.generate(prompts, params)
        for i, (out, ref) in enumerate(zip(outputs, expected)):
            got = out.outputs[0].token_ids
            assert got == ref, f"round {round_}, prompt {i} ({len(prompts[i])} tokens): first mismatch at " \
                               f"{next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))}"
            assert out.outputs[0].finish_reason == ("length" if len(ref) == MAX_TOKENS else "stop")
    stats = llm.engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"], "blocks leaked"
    if preempt:
        assert stats["preemptions"] > 0
    else:
        assert stats["preemptions"] == 0
    if prefix_caching:
        assert stats["prefix_hit_tokens"] > 0
    else:
        assert stats["prefix_hit_tokens"] == 0 and stats["cached_blocks"] == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_with_torch_linear_layers(arch, tiny_ckpts, references):
    # The fused q/k/v and gate/up projections without oneDNN packing: the GPU and half-precision path.
    prompts, expected = references[arch]
    llm = LLM(str(tiny_ckpts[arch]), dtype="float32", device="cpu", block_size=16, num_kv_blocks=256,
              linear_backend="torch")
    outputs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert [out.outputs[0].token_ids for out in outputs] == expected
