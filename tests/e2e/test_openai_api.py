"""The stack end to end through Envoy with the official `openai` client: outputs equal the offline engine's
token for token, usage is exact, streaming matches non-streaming, and the pools are whole afterwards."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import openai
import pytest

from e2e_stack import API_KEY, wait_until_pools_whole
from splitserve import SamplingParams

pytestmark = pytest.mark.timeout(300)


def _prompts(tokenizer, lengths, seed=0):
    """Text prompts of roughly the given token lengths, made of the tokenizer's own words."""
    rng = random.Random(seed)
    words = ["the", "model", "serves", "tokens", "quickly", "and", "blocks", "move", "between", "workers"]
    prompts = []
    for n in lengths:
        text = " ".join(rng.choice(words) for _ in range(n))
        ids = tokenizer.encode(text)
        prompts.append(tokenizer.decode(ids[:n]) if len(ids) > n else text)
    return prompts


def _offline(reference_llm, prompt, max_tokens):
    [out] = reference_llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return out


def test_models_lists_the_served_model(client, model_id, stack, llama_ckpt):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == model_id and models[0].object == "model"
    # The checkpoint folder's name, not its path.
    assert model_id == llama_ckpt.name
    card = client.models.retrieve(model_id)
    assert card.id == model_id and card.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(str(llama_ckpt))


def test_batch_of_prompts_each_equals_offline_engine(client, model_id, reference_llm):
    """A list of strings and a list of token-id lists: prompt i's choices at i * n + j, streamed alike."""
    tokenizer = reference_llm.get_tokenizer()
    texts = _prompts(tokenizer, [5, 30, 12], seed=7)
    id_lists = [list(range(50, 60)), list(range(300, 340))]
    for prompts in (texts, id_lists):
        references = [_offline(reference_llm, p, 12).outputs[0] for p in prompts]
        response = client.completions.create(model=model_id, prompt=prompts, max_tokens=12, temperature=0.0, n=2)
        assert [c.index for c in response.choices] == list(range(2 * len(prompts)))
        assert [c.text for c in response.choices] == [r.text for r in references for _ in range(2)]
        assert response.usage.completion_tokens == 2 * sum(len(r.token_ids) for r in references)
        streamed: dict[int, str] = {}
        for chunk in client.completions.create(model=model_id, prompt=prompts, max_tokens=12, temperature=0.0,
                                               n=2, stream=True):
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + choice.text
        assert streamed == {c.index: c.text for c in response.choices}


def test_stop_token_id_is_the_stop_reason(client, model_id, reference_llm):
    prompt = list(range(700, 730))    # a prefix no other test here uses (block counts are checked)
    tokens = _offline(reference_llm, prompt, 8).outputs[0].token_ids
    stop = next(t for i, t in enumerate(tokens) if i > 1 and t not in tokens[:i])
    for first in (False, True):     # a later token (decode) and the first one (prefill)
        stop_id = tokens[0] if first else stop
        response = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0.0,
                                             extra_body={"stop_token_ids": [stop_id]})
        choice = response.choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", stop_id)


def test_logit_bias_equals_offline_engine_on_prefill_and_decode(client, model_id, reference_llm):
    prompt = list(range(60, 90))
    base = _offline(reference_llm, prompt, 6).outputs[0].token_ids
    for bias in ({base[0]: -100.0, base[1]: -100.0}, {777: 100.0}):   # banned (first token too), forced
        [reference] = reference_llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                                      logit_bias=bias))
        expected = reference.outputs[0]
        assert expected.token_ids != base
        response = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0.0,
                                             logit_bias={str(t): b for t, b in bias.items()})
        assert response.choices[0].text == expected.text
    assert expected.token_ids == [777] * 6


def test_tokenize_and_detokenize_match_the_tokenizer(stack, model_id, reference_llm):
    tokenizer = reference_llm.get_tokenizer()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    root = stack.http_url
    text = "tokens move between workers"
    tokenized = httpx.post(f"{root}/tokenize", json={"model": model_id, "prompt": text}, headers=headers,
                           timeout=30).json()
    assert tokenized["tokens"] == tokenizer.encode(text) and tokenized["count"] == len(tokenized["tokens"])
    messages = [{"role": "user", "content": text}]
    chat = httpx.post(f"{root}/tokenize", json={"messages": messages}, headers=headers, timeout=30).json()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer.encode(rendered, add_special_tokens=False)
    back = httpx.post(f"{root}/detokenize", json={"tokens": tokenized["tokens"]}, headers=headers, timeout=30)
    assert back.json()["prompt"] == tokenizer.decode(tokenized["tokens"])


@pytest.mark.parametrize("length", [3, 16, 40, 130])
def test_completion_equals_offline_engine(client, model_id, reference_llm, length):
    [prompt] = _prompts(reference_llm.get_tokenizer(), [length], seed=length)
    reference = _offline(reference_llm, prompt, 24)
    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0.0)
    choice = response.choices[0]
    assert choice.text == reference.outputs[0].text
    assert choice.finish_reason == reference.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert response.usage.completion_tokens == len(reference.outputs[0].token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_token_id_prompt_and_streaming_match(client, model_id, reference_llm):
    prompt_ids = list(range(5, 75))
    reference = _offline(reference_llm, prompt_ids, 20)
    full = client.completions.create(model=model_id, prompt=prompt_ids, max_tokens=20, temperature=0.0)
    assert full.choices[0].text == reference.outputs[0].text
    stream = client.completions.create(model=model_id, prompt=prompt_ids, max_tokens=20, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    assert text == reference.outputs[0].text
    assert finish == reference.outputs[0].finish_reason
    assert usage.prompt_tokens == 70 and usage.completion_tokens == len(reference.outputs[0].token_ids)


def test_chat_streaming_and_not(client, model_id, reference_llm):
    tokenizer = reference_llm.get_tokenizer()
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "tokens move between workers and blocks move quickly"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    reference = _offline(reference_llm, prompt_ids, 30)
    response = client.chat.completions.create(model=model_id, messages=messages, max_tokens=30, temperature=0.0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == reference.outputs[0].text
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(reference.outputs[0].token_ids)
    stream = client.chat.completions.create(model=model_id, messages=messages, max_tokens=30, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True})
    content, roles, usage = "", [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            content += choice.delta.content or ""
    assert roles == ["assistant"] and content == reference.outputs[0].text
    assert usage.completion_tokens == len(reference.outputs[0].token_ids)


def test_min_tokens_holds_back_stop_ids_and_stop_strings(client, model_id, reference_llm):
    prompt = list(range(200, 240))
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    [base] = reference_llm.generate([prompt], greedy.replace(ignore_eos=True))
    tokens, text = base.outputs[0].token_ids, base.outputs[0].text
    # The first token as a stop id: the prefill worker's token would end the request at once.
    params = greedy.replace(stop_token_ids=[tokens[0]], min_tokens=5)
    [reference] = reference_llm.generate([prompt], params)
    expected = reference.outputs[0]
    assert len(expected.token_ids) >= 5 and tokens[0] not in expected.token_ids[:5]
    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0.0,
                                         extra_body={"stop_token_ids": [tokens[0]], "min_tokens": 5})
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.choices[0].finish_reason == expected.finish_reason

    # A stop string in the first two tokens' text is not looked for before min_tokens (engine and gateway).
    tokenizer = reference_llm.get_tokenizer()
    early = tokenizer.decode(tokens[:2], skip_special_tokens=True)
    stop = max((early[i:i + n] for n in (3, 2, 1) for i in range(len(early) - n + 1)
                if early[i:i + n].strip()), key=lambda s: (text.count(s) > 1, len(s)))
    [reference] = reference_llm.generate([prompt], greedy.replace(ignore_eos=True, stop=[stop], min_tokens=4))
    expected = reference.outputs[0]
    assert len(expected.token_ids) > 4
    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0.0,
                                         stop=[stop], extra_body={"min_tokens": 4, "ignore_eos": True})
    assert (response.choices[0].text, response.choices[0].finish_reason) == (expected.text, expected.finish_reason)
    assert response.usage.completion_tokens == len(expected.token_ids)


def test_chat_logprob_bytes_rebuild_the_text(client, model_id, reference_llm):
    messages = [{"role": "user", "content": "blocks move between workers"}]
    response = client.chat.completions.create(model=model_id, messages=messages, max_tokens=40, temperature=0.0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content, entries = response.choices[0].message.content, response.choices[0].logprobs.content
    # The demo model's random text splits characters over tokens: those show U+FFFD alone, not in their bytes.
    split = [e for e in entries if e.token == "\ufffd"]
    assert split and all(e.bytes != list("\ufffd".encode()) for e in split)
    # Joined, the bytes are the text's UTF-8 (random text may also hold bytes that are no character at all:
    # the text shows those as U+FFFD too).
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8", errors="replace") == content


def _tokenizer_calls(stack) -> dict[str, float]:
    """Tokenizer RPCs by method, summed over the replicas, from their own request counters."""
    calls: dict[str, float] = {}
    for port in stack.metrics_ports["tokenizer"]:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("splitserve_tokenizer_requests_total{"):
                method = line.split('method="', 1)[1].split('"', 1)[0]
                calls[method] = calls.get(method, 0.0) + float(line.rsplit(" ", 1)[1])
    return calls


def test_a_stream_costs_the_tokenizer_its_prompt_only(client, model_id, reference_llm, stack):
    # Text, stop strings and logprob entries come with the tokens from the workers: nothing per chunk.
    prompt = " ".join(["blocks move between workers"] * 8)
    [base] = reference_llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    text = base.outputs[0].text
    # A stop string that first appears past the middle, so the stream has many chunks before it.
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 3)
                if text[i:i + 3].strip() and text.find(text[i:i + 3]) == i)
    [reference] = reference_llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                                  stop=[stop]))
    before = _tokenizer_calls(stack)
    stream = client.completions.create(model=model_id, prompt=prompt, max_tokens=40, temperature=0.0, stop=[stop],
                                       logprobs=2, stream=True, extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    after = _tokenizer_calls(stack)
    assert len(chunks) > 1 and sum(len(c.choices[0].logprobs.tokens) for c in chunks) > 5
    assert "".join(c.choices[0].text for c in chunks) == reference.outputs[0].text == text[:text.find(stop)]
    assert (chunks[-1].choices[0].finish_reason, chunks[-1].choices[0].model_extra["stop_reason"]) == ("stop", stop)
    assert {m: n - before.get(m, 0.0) for m, n in after.items() if n != before.get(m, 0.0)} == {"Tokenize": 1.0}


def test_prompt_blocks_travel_through_the_kv_store(client, model_id, reference_llm, stack):
    from e2e_stack import kv_store_stats

    before = kv_store_stats(stack).blocks_used
    prompt = list(range(100, 100 + 16 * 6 + 5))  # 6 full blocks
    reference = _offline(reference_llm, prompt, 8)
    response = client.completions.create(model=model_id, prompt=prompt, max_tokens=8, temperature=0.0)
    assert response.choices[0].text == reference.outputs[0].text
    assert kv_store_stats(stack).blocks_used >= before + 6
    metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_ports['decode'][0]}/metrics").text
    assert 'splitserve_kv_transfer_blocks_total{direction="get"}' in metrics
    assert "splitserve_decode_kv_recompute_total{" not in metrics, "a transfer fell back to recompute"
    # The default data plane is UCX, through the store's mapped slab (one host), not the gRPC fallback.
    assert 'splitserve_kv_transfer_ucx_blocks_total{direction="get",path="mapped"}' in metrics
    assert "splitserve_kv_transfer_fallbacks_total{" not in metrics
    prefill_metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_ports['prefill'][0]}/metrics").text
    assert 'splitserve_kv_transfer_ucx_blocks_total{direction="put",path="mapped"}' in prefill_metrics


def test_32_concurrent_streams_then_pools_are_whole(stack, model_id, reference_llm):
    tokenizer = reference_llm.get_tokenizer()
    rng = random.Random(7)
    lengths = [rng.randint(1, 300) for _ in range(32)]
    prompts = _prompts(tokenizer, lengths, seed=1)
    max_tokens = [rng.randint(4, 40) for _ in range(32)]
    references = reference_llm.generate(
        prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens])

    async def one(client, prompt, m):
        stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=m, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            usage = chunk.usage or usage
            text += "".join(c.text for c in chunk.choices)
        return text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, max_tokens)))

    results = asyncio.run(main())
    for (text, usage), reference in zip(results, references):
        assert text == reference.outputs[0].text
        assert usage.prompt_tokens == len(reference.prompt_token_ids)
        assert usage.completion_tokens == len(reference.outputs[0].token_ids)
    whole, stats, store = wait_until_pools_whole(stack)
    assert whole, (stats, store)


def test_client_disconnect_frees_decode_blocks(stack, model_id):
    body = {"model": model_id, "prompt": list(range(3, 60)), "max_tokens": 900, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{stack.base_url}/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen >= 3:
                    break
    whole, stats, store = wait_until_pools_whole(stack)
    assert whole, (stats, store)


@pytest.mark.parametrize("case", ["malformed", "wrong_type", "unknown_model", "max_tokens_0", "too_long",
                                  "bad_key", "no_key", "bad_top_p"])
def test_bad_input_gets_openai_errors(stack, model_id, case):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    body = {"model": model_id, "prompt": "hello", "max_tokens": 4}
    expected = 400
    if case == "malformed":
        content = b'{"model": "x", "prompt": '
    else:
        if case == "wrong_type":
            body["max_tokens"] = "four"
        elif case == "unknown_model":
            body["model"], expected = "no-such-model", 404
        elif case == "max_tokens_0":
            body["max_tokens"] = 0
        elif case == "too_long":
            body["prompt"] = list(range(1, 1000)) * 2
        elif case == "bad_top_p":
            body["top_p"] = 1.5
        elif case == "bad_key":
            headers["Authorization"], expected = "Bearer wrong", 401
        elif case == "no_key":
            del headers["Authorization"]
            expected = 401
        content = json.dumps(body).encode()
    response = httpx.post(f"{stack.base_url}/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == expected, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert set(error) >= {"message", "type", "param", "code"}
    # The stack keeps serving.
    ok = httpx.post(f"{stack.base_url}/completions", json={"model": model_id, "prompt": "hi", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert ok.status_code == 200


def test_repeated_prompt_reports_cached_tokens(client, model_id):
    prompt = list(range(400, 400 + 16 * 4 + 2))
    first = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0.0)
    second = client.completions.create(model=model_id, prompt=prompt, max_tokens=4, temperature=0.0)
    assert second.choices[0].text == first.choices[0].text
    assert second.usage.prompt_tokens_details.cached_tokens == 4 * 16


# --- the public edge: limits and bad input through Envoy ------------------------------------------------------


@pytest.mark.parametrize("case", ["seed_2_64", "surrogate_prompt", "surrogate_chat", "surrogate_stop", "nan", "n_129",
                                  "10_mb_prompt"])
def test_edge_refuses_bad_input_with_4xx(stack, model_id, case):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    path, raw, expected = "/completions", None, 400
    body = {"model": model_id, "prompt": "hello", "max_tokens": 2}
    if case == "seed_2_64":
        body["seed"] = 2**64
    elif case == "surrogate_prompt":
        raw = json.dumps(body).replace('"hello"', '"hel\\ud800lo"')
    elif case == "surrogate_chat":
        path = "/chat/completions"
        raw = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "\ud800"}]})
    elif case == "surrogate_stop":
        body["stop"] = ["\udfff"]      # json.dumps writes it as the escape \udfff
    elif case == "nan":
        body["temperature"] = float("nan")   # json.dumps writes NaN
    elif case == "n_129":
        body["n"] = 129
    elif case == "10_mb_prompt":
        body["prompt"], expected = "x" * 10_000_000, 413
    response = httpx.post(f"{stack.base_url}{path}", content=(raw or json.dumps(body)).encode(), headers=headers,
                          timeout=30)
    assert response.status_code == expected, response.text[:500]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    if expected == 413:
        assert str(8 * 2**20) in error["message"]


def test_concurrent_requests_may_share_an_x_request_id(stack, model_id):
    headers = {"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "shared-trace-id"}
    long = {"model": model_id, "prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{stack.base_url}/completions", json=long, headers=headers) as first:
            assert first.status_code == 200 and first.headers["x-request-id"] == "shared-trace-id"
            next(first.iter_lines())   # running in the engine now
            second = http.post(f"{stack.base_url}/completions", headers=headers,
                               json={"model": model_id, "prompt": "hello", "max_tokens": 2})
            assert second.status_code == 200, second.text
            assert second.headers["x-request-id"] == "shared-trace-id"
    whole, stats, store = wait_until_pools_whole(stack)
    assert whole, (stats, store)


def test_metrics_on_the_public_port_need_the_key_and_envoy_has_no_admin(stack):
    import yaml
    assert httpx.get(f"{stack.http_url}/metrics", timeout=30).status_code == 401
    reply = httpx.get(f"{stack.http_url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert reply.status_code == 200 and "splitserve_gateway_requests_total" in reply.text
    assert "admin" not in yaml.safe_load(stack.plan.envoy_config_path.read_text())
