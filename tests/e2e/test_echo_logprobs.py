"""Completions' `echo`, prompt logprobs and `max_tokens: 0` through the real stack with the `openai` client, on
both prefill paths: a prompt of 16 tokens or more is prefilled by the prefill worker (disaggregated), a shorter
one by the decode worker itself. Prompt logprobs equal the offline engine's (itself checked against transformers
in tests/engine/test_prompt_logprobs.py)."""

from __future__ import annotations

import openai
import pytest

from e2e_stack import API_KEY, wait_until_pools_whole
from splitserve import SamplingParams
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)

LOCAL_PREFILL_BELOW = 16
# float32 engines on both sides, logprobs sent as float32: 1e-4 nats.
TOL = 1e-4
LONG = "the model serves tokens quickly and blocks move between workers while the gateway formats every answer"
SHORT = "blocks move"


@pytest.fixture(scope="module")
def stack(llama_ckpt, tmp_path_factory):
    with Stack(model=str(llama_ckpt), prefill_workers=1, decode_workers=1, api_key=API_KEY, torch_threads=1,
               num_kv_blocks=256, local_prefill_threshold=LOCAL_PREFILL_BELOW,
               prefill_decider="threshold",   # the long prompt always to the prefill worker, the short one never
               log_dir=str(tmp_path_factory.mktemp("stack-logs"))) as running:
        yield running


def _offline(reference_llm, prompt, max_tokens: int, k: int):
    [out] = reference_llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                            prompt_logprobs=k, logprobs=k))
    return out


def test_prompts_take_both_prefill_paths(reference_llm):
    tokenizer = reference_llm.get_tokenizer()
    assert len(tokenizer.encode(LONG)) >= LOCAL_PREFILL_BELOW > len(tokenizer.encode(SHORT))


@pytest.mark.parametrize("prompt", [LONG, SHORT], ids=["prefill-worker", "decode-prefills"])
def test_echo_with_max_tokens_0_gives_the_prompt_and_its_logprobs(client, model_id, reference_llm, prompt):
    """lm-eval's loglikelihood request: echo, max_tokens 0, logprobs 1."""
    reference = _offline(reference_llm, prompt, 1, 2)
    ids = reference.prompt_token_ids
    pieces = reference_llm.engine.token_pieces
    for stream in (False, True):
        if stream:
            chunks = list(client.completions.create(model=model_id, prompt=prompt, echo=True, max_tokens=0,
                                                    logprobs=2, stream=True))
            assert len(chunks) == 1
            choice = chunks[0].choices[0]
        else:
            response = client.completions.create(model=model_id, prompt=prompt, echo=True, max_tokens=0, logprobs=2)
            assert response.usage.completion_tokens == 0 and response.usage.prompt_tokens == len(ids)
            choice = response.choices[0]
        assert choice.text == prompt
        assert choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == [pieces(t)[0] for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i, (token, entry) in enumerate(zip(ids[1:], reference.prompt_logprobs[1:]), start=1):
            assert lp.token_logprobs[i] == pytest.approx(entry[token], abs=TOL)
            top = sorted(entry.items(), key=lambda item: item[1])[-2:]   # the prompt token may be outside them
            # OpenAI keys alternatives by their text: two partial characters (both U+FFFD) share one key.
            expected = {pieces(t)[0]: value for t, value in reversed(top)}
            assert lp.top_logprobs[i] == pytest.approx(expected, abs=TOL)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


@pytest.mark.parametrize("prompt", [LONG, SHORT], ids=["prefill-worker", "decode-prefills"])
def test_echo_with_generation_puts_the_prompt_first(client, model_id, reference_llm, prompt):
    reference = _offline(reference_llm, prompt, 4, 1)
    generated = reference.outputs[0]
    response = client.completions.create(model=model_id, prompt=prompt, echo=True, max_tokens=4, logprobs=1,
                                         temperature=0.0)
    choice = response.choices[0]
    assert choice.text == prompt + generated.text
    n_prompt = len(reference.prompt_token_ids)
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + len(generated.token_ids)
    assert lp.token_logprobs[0] is None
    expected = [e[t] for t, e in zip(reference.prompt_token_ids[1:], reference.prompt_logprobs[1:])]
    expected += [e[t] for t, e in zip(generated.token_ids, generated.logprobs)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=TOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert response.usage.completion_tokens == len(generated.token_ids)
    # Streamed: the prompt opens the first chunk; the pieces add up to the same choice.
    text, tokens, values, offsets = "", [], [], []
    for chunk in client.completions.create(model=model_id, prompt=prompt, echo=True, max_tokens=4, logprobs=1,
                                           temperature=0.0, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert (text, tokens, values, offsets) == (choice.text, lp.tokens, lp.token_logprobs, lp.text_offset)


def test_echo_without_logprobs_and_batched_prompts(client, model_id, reference_llm):
    """A list of texts and a list of token-id lists: each choice echoes its own prompt (ids as their text)."""
    tokenizer = reference_llm.get_tokenizer()
    id_prompts = [list(range(300, 320)), list(range(50, 55))]
    for prompts, texts in (([LONG, SHORT], [LONG, SHORT]),
                           (id_prompts, [tokenizer.decode(p) for p in id_prompts])):
        response = client.completions.create(model=model_id, prompt=prompts, echo=True, max_tokens=0)
        assert [c.text for c in response.choices] == texts
        assert all(c.logprobs is None and c.finish_reason == "length" for c in response.choices)
        assert response.usage.completion_tokens == 0
        response = client.completions.create(model=model_id, prompt=prompts, echo=True, max_tokens=3,
                                             temperature=0.0, n=2)
        offline = [reference_llm.generate([p], SamplingParams(max_tokens=3, temperature=0.0))[0].outputs[0].text
                   for p in prompts]
        assert [c.text for c in response.choices] == [t + o for t, o in zip(texts, offline) for _ in range(2)]


def test_max_tokens_0_needs_echo(client, model_id):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model_id, prompt=SHORT, max_tokens=0)
    assert exc.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model_id, prompt=SHORT, max_tokens=2, extra_body={"prompt_logprobs": 21})
    assert exc.value.body["param"] == "prompt_logprobs"


@pytest.mark.parametrize("prompt", [LONG, SHORT], ids=["prefill-worker", "decode-prefills"])
def test_vllm_prompt_logprobs_on_completions_and_chat(client, model_id, reference_llm, prompt):
    reference = _offline(reference_llm, prompt, 2, 3)
    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=2, temperature=0.0,
                                         extra_body={"prompt_logprobs": 3})
    choice = response.choices[0]
    assert choice.text == reference.outputs[0].text and choice.logprobs is None
    got = choice.model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == len(reference.prompt_token_ids)
    for token, entry, expected in zip(reference.prompt_token_ids[1:], got[1:], reference.prompt_logprobs[1:]):
        assert set(entry) == {str(t) for t in expected}
        assert entry[str(token)]["logprob"] == pytest.approx(expected[token], abs=TOL)
        ranked = sorted((e for e in entry.values() if e["rank"] is not None), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked] == [1, 2, 3]
        assert [e["logprob"] for e in ranked] == sorted((e["logprob"] for e in ranked), reverse=True)
    streamed = [c.choices[0].model_extra.get("prompt_logprobs") for c in client.completions.create(
        model=model_id, prompt=prompt, max_tokens=2, temperature=0.0, stream=True, extra_body={"prompt_logprobs": 3})
        if c.choices]
    assert streamed[0] == got and all(p is None for p in streamed[1:])
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=2, temperature=0.0, extra_body={"prompt_logprobs": 0})
    chat_prompt = chat.choices[0].model_extra["prompt_logprobs"]
    assert chat_prompt[0] is None and len(chat_prompt) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 for entry in chat_prompt[1:])


def test_pools_whole_after_the_requests(stack):
    whole, stats, store = wait_until_pools_whole(stack)
    assert whole, (stats, store)
