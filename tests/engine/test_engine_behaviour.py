"""What the engine promises beyond greedy equality: logprobs, prefix reuse, stops, seeds, n, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hf_reference import hf_greedy, hf_logprobs, mixed_prompts
from splitserve import LLM, InvalidRequestError, SamplingParams
from splitserve.models.loader import UnsupportedModelError

VOCAB = 1000


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=128, max_num_batched_tokens=256)
    yield engine
    stats = engine.engine.stats()
    assert stats["free_blocks"] == stats["num_blocks"], "blocks leaked"


@pytest.fixture(autouse=True)
def pool_is_whole_after_each_test(request):
    yield
    if "llm" in request.fixturenames:
        stats = request.getfixturevalue("llm").engine.stats()
        assert stats["free_blocks"] == stats["num_blocks"], f"blocks leaked: {stats}"
        assert stats["running"] == stats["waiting"] == 0


def test_logprobs_match_transformers_log_softmax(llm, llama_ckpt):
    prompts = mixed_prompts(VOCAB, [5, 40, 90], seed=3)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        completion = out.outputs[0]
        reference = hf_logprobs(str(llama_ckpt), prompt, completion.token_ids)
        assert len(completion.logprobs) == len(completion.token_ids)
        for pos, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            # Tolerance: float32 with different matmul shapes than transformers; 1e-4 nats is far below any gap.
            assert entry[token] == pytest.approx(reference[pos, token].item(), abs=1e-4)
            top = torch.topk(reference[pos], 3)
            assert set(entry) >= set(top.indices.tolist())
            for tid, value in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[tid] == pytest.approx(value, abs=1e-4)
        assert completion.cumulative_logprob == pytest.approx(
            sum(reference[i, t].item() for i, t in enumerate(completion.token_ids)), abs=1e-3)


def test_prefix_cache_skips_shared_prefix_and_shares_blocks(llama_ckpt):
    llm = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=64, block_size=16)
    engine = llm.engine
    prefix = mixed_prompts(VOCAB, [200], seed=11)[0]
    first, second = prefix + [5, 6, 7, 8, 9], prefix + list(range(100, 130))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("a", first, params)
    engine.step()  # prefills all of `first`; its 12 full blocks are now registered
    computed_before = engine.stats()["prompt_tokens_computed"]
    engine.add_request("b", second, params)
    engine.step()
    [seq_a], [seq_b] = engine.requests["a"].seqs, engine.requests["b"].seqs
    shared_blocks = 200 // 16
    assert seq_b.block_ids[:shared_blocks] == seq_a.block_ids[:shared_blocks]
    assert all(engine.pool.ref_count(b) == 2 for b in seq_a.block_ids[:shared_blocks])
    assert engine.stats()["prompt_tokens_computed"] - computed_before == len(second) - shared_blocks * 16
    assert seq_b.num_cached_tokens == shared_blocks * 16
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step()})
    assert done["b"].num_cached_tokens == 192
    assert done["b"].outputs[0].token_ids == hf_greedy(str(llama_ckpt), second, 4, ignore_eos=True)
    assert engine.stats()["free_blocks"] == 64


def test_stop_token_ids_and_stop_strings(llm):
    prompt = mixed_prompts(VOCAB, [30], seed=5)[0]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    [base] = llm.generate([prompt], greedy)
    tokens = base.outputs[0].token_ids
    stop_at = next(i for i in range(3, 20) if tokens[i] not in tokens[:i])
    [out] = llm.generate([prompt], greedy.replace(stop_token_ids=[tokens[stop_at]]))
    assert out.outputs[0].token_ids == tokens[: stop_at + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", tokens[stop_at])

    text = base.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    [out] = llm.generate([prompt], greedy.replace(stop=[stop]))
    assert out.outputs[0].text == text[: text.find(stop)]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
    assert len(out.outputs[0].token_ids) < len(tokens)


def _eos_everywhere(llama_ckpt) -> tuple[LLM, int, list[int]]:
    """An engine whose greedy choice is EOS at every position (its lm_head row scaled up), its EOS id, a prompt.
    Its linear layers stay torch's, so that the loaded weight can be edited in place."""
    llm = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=32, linear_backend="torch")
    eos = llm.get_tokenizer().eos_token_id
    with torch.no_grad():
        llm.engine.runner.model.lm_head.weight[eos] *= 200.0
    return llm, eos, mixed_prompts(VOCAB, [10], seed=9)[0]


def test_eos_ends_generation_unless_ignored(llama_ckpt):
    llm, eos, prompt = _eos_everywhere(llama_ckpt)
    [stopped] = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))
    assert stopped.outputs[0].token_ids[-1] == eos and stopped.outputs[0].finish_reason == "stop"
    [ignored] = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert len(ignored.outputs[0].token_ids) == 8 and ignored.outputs[0].finish_reason == "length"


def test_min_tokens_holds_back_stop_ids_and_eos_like_transformers(llm, llama_ckpt):
    prompt = mixed_prompts(VOCAB, [30], seed=5)[0]
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    [base] = llm.generate([prompt], greedy.replace(ignore_eos=True))
    tokens = base.outputs[0].token_ids
    stop_id = tokens[2]
    [stopped] = llm.generate([prompt], greedy.replace(stop_token_ids=[stop_id]))
    assert stopped.outputs[0].token_ids == tokens[:3]

    [held] = llm.generate([prompt], greedy.replace(stop_token_ids=[stop_id], min_tokens=5))
    out = held.outputs[0]
    assert len(out.token_ids) >= 5 and stop_id not in out.token_ids[:5]
    # transformers' min_new_tokens masks every id that ends generation, here the stop id and the model's EOS.
    ending = [stop_id, *sorted(llm.engine.eos_token_ids)]
    assert out.token_ids == hf_greedy(str(llama_ckpt), prompt, 12, eos_token_ids=ending, min_new_tokens=5)


def test_min_tokens_holds_back_eos(llama_ckpt):
    llm, eos, prompt = _eos_everywhere(llama_ckpt)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, min_tokens=4))
    assert len(out.outputs[0].token_ids) == 5 and eos not in out.outputs[0].token_ids[:4]
    assert out.outputs[0].token_ids[4] == eos and out.outputs[0].finish_reason == "stop"
    [sampled] = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=3, min_tokens=6))
    assert len(sampled.outputs[0].token_ids) >= 6 and eos not in sampled.outputs[0].token_ids[:6]


def test_stop_strings_before_min_tokens_do_not_end_the_sequence(llm):
    prompt = mixed_prompts(VOCAB, [30], seed=5)[0]
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    [base] = llm.generate([prompt], greedy)
    tokenizer = llm.get_tokenizer()
    tokens, text = base.outputs[0].token_ids, base.outputs[0].text
    early = tokenizer.decode(tokens[:2], skip_special_tokens=True)
    floor = len(tokenizer.decode(tokens[:4], skip_special_tokens=True))  # min_tokens=4 tokens' text
    # A stop string in the first two tokens' text that comes back after the first four.
    stop, later = next((s, text.find(s, floor - len(s) + 1)) for n in (4, 3, 2) for i in range(len(early) - n + 1)
                       if (s := early[i:i + n]).strip() == s and text.find(s, floor - len(s) + 1) >= 0)
    [plain] = llm.generate([prompt], greedy.replace(stop=[stop]))
    assert len(plain.outputs[0].token_ids) <= 2 and plain.outputs[0].text == text[:text.find(stop)]
    [held] = llm.generate([prompt], greedy.replace(stop=[stop], min_tokens=4))
    out = held.outputs[0]
    assert (out.finish_reason, out.stop_reason, out.text) == ("stop", stop, text[:later])
    assert len(out.token_ids) > 4 and out.token_ids == tokens[:len(out.token_ids)]


def test_seeded_sampling_is_independent_of_the_batch(llm):
    prompts = mixed_prompts(VOCAB, [12, 50, 8, 70], seed=2)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    [alone] = llm.generate([prompts[0]], seeded)
    others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 3
    together = llm.generate(prompts[1:3] + [prompts[0]] + prompts[3:], others[:2] + [seeded] + others[2:])
    assert together[2].outputs[0].token_ids == alone.outputs[0].token_ids
    [other_seed] = llm.generate([prompts[0]], seeded.replace(seed=99))
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_completions_and_penalties(llm):
    prompt = mixed_prompts(VOCAB, [20], seed=4)[0]
    [out] = llm.generate([prompt], SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    [base] = llm.generate([prompt], plain)
    [penalised] = llm.generate([prompt], plain.replace(repetition_penalty=5.0, frequency_penalty=2.0))
    repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert repeats(penalised.outputs[0].token_ids) <= repeats(base.outputs[0].token_ids)
    assert penalised.outputs[0].token_ids != base.outputs[0].token_ids or repeats(base.outputs[0].token_ids) == 0


def test_text_prompt_and_max_model_len(llama_ckpt):
    llm = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=16, max_model_len=40)
    tok = llm.get_tokenizer()
    [out] = llm.generate("Hello world", SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    assert out.prompt_token_ids == tok.encode("Hello world")
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 40
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("prompt,params,param", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1] * 2000, SamplingParams(), "prompt"),
    ([VOCAB + 5], SamplingParams(), "prompt"),
])
def test_bad_prompts_raise_and_engine_stays_usable(llm, prompt, params, param):
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([[5, 6, 7], prompt], params)
    assert info.value.param == param
    [ok] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(ok.outputs[0].token_ids) >= 1


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_k": -3}, "top_k"),
    ({"n": 0}, "n"),
])
def test_bad_sampling_params_raise(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_unknown_keyword_is_type_error(llama_ckpt):
    with pytest.raises(TypeError):
        SamplingParams(max_token=3)
    with pytest.raises(TypeError):
        LLM(str(llama_ckpt), num_blocks=4)


def test_unknown_architecture_is_named(llama_ckpt, tmp_path):
    folder = tmp_path / "falcon"
    shutil.copytree(llama_ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="FalconForCausalLM"):
        LLM(str(folder), device="cpu")


def test_sharded_checkpoint_loads_same_weights(llama_ckpt, sharded_llama_ckpt):
    prompt = mixed_prompts(VOCAB, [25], seed=8)[0]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    a = LLM(str(llama_ckpt), device="cpu", dtype="float32", num_kv_blocks=8).generate([prompt], params)
    b = LLM(str(sharded_llama_ckpt), device="cpu", dtype="float32", num_kv_blocks=8).generate([prompt], params)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_missing_model_is_a_clear_error(tmp_path):
    from splitserve.models.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path), device="cpu")


def test_kv_blocks_from_a_memory_budget(llama_ckpt):
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K and V x 2 layers x 16 tokens x 2 KV heads x head_dim 16 x float32
    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", kv_cache_memory_bytes=40 * per_block + 100).engine
    assert engine.layout.bytes_per_block == per_block
    assert engine.num_blocks == 40
    # A budget larger than every sequence could fill is capped at what max_num_seqs x max_model_len can use.
    capped = LLM(str(llama_ckpt), dtype="float32", device="cpu", kv_cache_memory_bytes=2**34, max_num_seqs=2,
                 max_model_len=64).engine
    assert capped.num_blocks == 2 * (64 // 16) + 1
    with pytest.raises(RuntimeError, match="no memory left"):
        LLM(str(llama_ckpt), dtype="float32", device="cpu", kv_cache_memory_bytes=per_block // 2)


def test_the_step_hook_hears_each_steps_prompt_tokens_before_the_model_runs(llama_ckpt):
    """What a serving worker sizes the step's threads from (serving/core_borrowing.py): prompt tokens computed,
    chunks of a prompt split by the token budget included; 0 for a decode step."""
    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=64, max_num_batched_tokens=32).engine
    heard = []
    engine.before_model_run = lambda prompt_tokens: heard.append((prompt_tokens, engine.num_prompt_tokens_computed))
    engine.add_request("r", list(range(3, 53)), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert heard == [(32, 0), (18, 32), (0, 50), (0, 50)]


def test_the_async_loop_says_when_the_engine_runs_out_of_work(llama_ckpt):
    """What a serving worker tells its neighbours (serving/core_activity.py): idle once at start, busy steps while
    a request runs, idle again once it ended, and nothing said while steps run."""
    import asyncio

    from splitserve.engine.async_engine import AsyncEngine

    engine = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=64).engine
    heard = []
    engine.before_model_run = lambda prompt_tokens: heard.append("step")
    loop_engine = AsyncEngine(engine)
    loop_engine.on_idle = lambda: heard.append("idle")

    async def main():
        loop_engine.start()
        try:
            await asyncio.sleep(0.2)
            params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
            async for _ in loop_engine.generate("r", list(range(3, 40)), params):
                pass
            for _ in range(100):                 # the loop thread says idle after it posted the last token
                if heard[-1] == "idle":
                    break
                await asyncio.sleep(0.02)
        finally:
            await loop_engine.stop()

    asyncio.run(main())
    assert heard[0] == "idle" and heard[-1] == "idle"
    steps = [i for i, said in enumerate(heard) if said == "step"]
    assert len(steps) == 3 and "idle" not in heard[steps[0]:steps[-1]]
