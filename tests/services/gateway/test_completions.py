"""POST /v1/completions through the official openai client: text, streaming, usage, n, stop strings, logprobs."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY

from . import fakes


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_completion_is_the_models_tokens_as_text_with_exact_usage(gateway, stack):
    prompt = "hello 40"
    result = gateway.openai().completions.create(model="fake-model", prompt=prompt, max_tokens=5)
    expected = fakes.expected_tokens(fakes.tokenize(prompt), 5)
    assert result.choices[0].text == fakes.decode_text(expected) == " w41 w42 w43 w44 w45"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == 2
    assert result.usage.completion_tokens == 5
    assert result.usage.total_tokens == 7
    assert result.usage.prompt_tokens_details.cached_tokens == stack.prefill.cached_tokens
    assert result.id.startswith("cmpl-") and result.model == "fake-model" and result.object == "text_completion"
    # Prefill ran first and decode continued after its first token, from its KV handle.
    [prefill] = stack.prefill.requests
    [decode] = stack.decode.requests
    assert list(prefill.prompt_token_ids) == fakes.tokenize(prompt)
    assert prefill.sampling_params.max_tokens == 5
    assert prefill.kv_target.store_address == "127.0.0.1:50090"
    assert list(decode.produced_token_ids) == [41] and decode.kv_handle.store_address == "127.0.0.1:50090"


def test_utf8_character_split_over_two_tokens_and_eos(gateway):
    # 996, 997 (first byte of "é"), 998 (second byte), 999, 0 (EOS, a special token: not in the text)
    result = gateway.openai().completions.create(model="fake-model", prompt="x 995", max_tokens=50)
    assert result.choices[0].text == " w996é w999"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == 5


def test_stream_gives_the_same_text_in_chunks_and_usage_last(gateway):
    client = gateway.openai()
    whole = client.completions.create(model="fake-model", prompt="x 993", max_tokens=8)
    chunks = list(client.completions.create(model="fake-model", prompt="x 993", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text
    assert all("\ufffd" not in t for t in texts)                 # no chunk ends inside "é"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == 2


def test_stream_is_server_sent_events_ending_with_done(gateway):
    with gateway.http_client() as http:
        with http.stream("POST", "/v1/completions", json={"prompt": "x 10", "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == " w11 w12 w13"
    assert "usage" not in chunks[0]


def test_n2_runs_two_seeded_sequences_and_counts_the_prompt_once(gateway, stack):
    result = gateway.openai().completions.create(model="fake-model", prompt="x 100", max_tokens=4, n=2, seed=5)
    by_index = {c.index: c.text for c in result.choices}
    prompt = fakes.tokenize("x 100")
    assert by_index[0] == fakes.decode_text(fakes.expected_tokens(prompt, 4, seed=5))
    assert by_index[1] == fakes.decode_text(fakes.expected_tokens(prompt, 4, seed=6))
    assert by_index[0] != by_index[1]
    assert result.usage.prompt_tokens == 2 and result.usage.completion_tokens == 8
    assert sorted(r.sampling_params.seed for r in stack.prefill.requests) == [5, 6]
    assert all(r.sampling_params.n == 1 for r in stack.prefill.requests + stack.decode.requests)


def test_n2_without_seed_leaves_the_seed_unset(gateway, stack):
    result = gateway.openai().completions.create(model="fake-model", prompt="x 100", max_tokens=2, n=2,
                                                 stream=False)
    assert len(result.choices) == 2
    assert not any(r.sampling_params.HasField("seed") for r in stack.prefill.requests)


def test_the_worker_ends_a_sequence_at_its_stop_string_and_the_gateway_forwards_it(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.01})
    gateway = stack.start_gateway()
    result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=200, stop=" w43")
    choice = result.choices[0]
    assert choice.text == " w41 w42"
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == " w43"
    assert result.usage.completion_tokens == 3          # 41, 42 and 43, which held the stop string
    stack.wait_for(lambda: stack.decode.finished or stack.decode.cancelled, timeout=2)  # the fake's bookkeeping
    assert stack.decode.finished == [stack.decode.requests[-1].request_id] and stack.decode.cancelled == []


def test_stop_reason_names_the_stop_token_id(gateway):
    result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=20,
                                                 extra_body={"stop_token_ids": [44]})
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (" w41 w42 w43 w44", "stop", 44)


@pytest.mark.parametrize("chat", [False, True])
def test_the_tokenizer_sees_no_per_token_traffic(make_stack, chat):
    # Text and logprob entries come with the tokens from the workers: a stream costs the tokenizer its prompt.
    stack = make_stack(decode={"chunk_tokens": 1})
    gateway = stack.start_gateway()
    client = gateway.openai()
    client.models.list()
    before = dict(stack.tokenizer.servicer.calls)
    if chat:
        chunks = list(client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=40, stream=True, logprobs=True, top_logprobs=2))
    else:
        chunks = list(client.completions.create(model="fake-model", prompt="x 100", max_tokens=40, stream=True,
                                                logprobs=2))
    assert len([c for c in chunks if c.choices]) >= 40
    after = stack.tokenizer.servicer.calls
    assert {m: after[m] - before.get(m, 0) for m in after if after[m] != before.get(m, 0)} == {"Tokenize": 1}


def test_stop_string_spanning_tokens_is_never_streamed(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.005, "chunk_tokens": 2})
    gateway = stack.start_gateway()
    chunks = list(gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=200,
                                                      stop=["2 w4"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " w41 w4"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_end_nothing_before_min_tokens(make_stack, stream):
    # Every token's text holds " w4"; the first three (41, 42, 43) may not end the sequence, the fourth does.
    stack = make_stack(decode={"chunk_tokens": 2})
    gateway = stack.start_gateway()
    result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=20, stop=" w4",
                                                 extra_body={"min_tokens": 3}, stream=stream)
    if stream:
        chunks = list(result)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = result.choices[0].text, result.choices[0].finish_reason
        assert result.usage.completion_tokens == 4
    assert (text, finish) == (" w41 w42 w43", "stop")
    assert stack.prefill.requests[-1].sampling_params.min_tokens == 3
    assert stack.decode.requests[-1].sampling_params.min_tokens == 3


def test_held_back_text_is_released_when_no_stop_string_comes(gateway):
    # Every token's text ends with a prefix of the stop string, so each is held back until the next one.
    result = gateway.openai().completions.create(model="fake-model", prompt="x 20", max_tokens=3, stop=["w2x"])
    assert result.choices[0].text == " w21 w22 w23"
    assert result.choices[0].finish_reason == "length"
    chunks = list(gateway.openai().completions.create(model="fake-model", prompt="x 20", max_tokens=3,
                                                      stop=["w2x"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " w21 w22 w23"


def test_logprobs_have_token_strings_and_alternatives(gateway):
    result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=3, logprobs=2)
    lp = result.choices[0].logprobs
    assert lp.tokens == [" w41", " w42", " w43"]
    assert lp.token_logprobs == [-0.5, -0.5, -0.5]
    assert lp.top_logprobs[0] == {" w41": -0.5, " w541": -1.5}
    assert lp.text_offset == [0, 4, 8]


def test_max_tokens_1_is_answered_by_prefill_alone(gateway, stack):
    result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=1)
    assert result.choices[0].text == " w41"
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 1
    assert stack.decode.requests == []


def test_prompt_as_token_ids_and_as_a_one_element_batch(gateway):
    client = gateway.openai()
    assert client.completions.create(model="fake-model", prompt=[5, 6], max_tokens=3).choices[0].text == "é w9"
    assert client.completions.create(model="fake-model", prompt=[[5, 16]], max_tokens=2).choices[0].text == "é"
    assert client.completions.create(model="fake-model", prompt=["x 10"], max_tokens=1).choices[0].text == " w11"


def test_default_model_and_max_tokens(gateway):
    result = gateway.openai().completions.create(model="", prompt="x 100")
    assert result.usage.completion_tokens == 16


def test_short_prompts_are_prefilled_by_decode_below_the_threshold(stack):
    gateway = stack.start_gateway(local_prefill_threshold=3)
    before = _sample("splitserve_gateway_local_prefill_total", reason="below_threshold")
    short = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=4)
    assert short.choices[0].text == " w41 w42 w43 w44"
    assert stack.prefill.requests == []
    [decode] = stack.decode.requests
    assert not decode.produced_token_ids and not decode.HasField("kv_handle")
    assert short.usage.prompt_tokens_details.cached_tokens == stack.decode.cached_tokens
    assert _sample("splitserve_gateway_local_prefill_total", reason="below_threshold") == before + 1
    long = gateway.openai().completions.create(model="fake-model", prompt="a b x 40", max_tokens=4)
    assert long.choices[0].text == short.choices[0].text
    assert len(stack.prefill.requests) == 1


def test_without_prefill_workers_decode_prefills(make_stack):
    stack = make_stack(num_prefill=0)
    gateway = stack.start_gateway()
    result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=3)
    assert result.choices[0].text == " w41 w42 w43"
    assert not stack.decode.requests[0].produced_token_ids


@pytest.mark.parametrize("prompts", [["x 10", "y 500", "z 20"], [[10], [7, 500], [3, 20]]])
def test_a_batch_of_prompts_gets_each_its_choices_in_openai_order(gateway, prompts):
    """Prompt i's choice j is index i * n + j; usage sums the prompts; streamed text matches, per index."""
    client = gateway.openai()
    ids = [fakes.tokenize(p) if isinstance(p, str) else p for p in prompts]
    expected = [fakes.decode_text(fakes.expected_tokens(p, 4)) for p in ids]
    result = client.completions.create(model="fake-model", prompt=prompts, max_tokens=4, n=2)
    assert [c.index for c in result.choices] == list(range(6))
    assert [c.text for c in result.choices] == [text for text in expected for _ in range(2)]
    assert result.usage.prompt_tokens == sum(len(p) for p in ids)
    assert result.usage.completion_tokens == 6 * 4
    streamed: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model="fake-model", prompt=prompts, max_tokens=4, n=2, stream=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in result.choices}
    assert (usage.prompt_tokens, usage.completion_tokens) == (result.usage.prompt_tokens, 24)


def test_stop_token_id_is_the_stop_reason_streamed_or_not(gateway):
    client = gateway.openai()
    whole = client.completions.create(model="fake-model", prompt="x 40", max_tokens=20,
                                      extra_body={"stop_token_ids": [43]})
    assert (whole.choices[0].finish_reason, whole.choices[0].model_extra["stop_reason"]) == ("stop", 43)
    # A stop id that is also EOS: the worker names no stop reason (EOS is checked first), the client's id it is.
    eos = client.completions.create(model="fake-model", prompt="x 995", max_tokens=20,
                                    extra_body={"stop_token_ids": [fakes.EOS]})
    assert (eos.choices[0].finish_reason, eos.choices[0].model_extra["stop_reason"]) == ("stop", fakes.EOS)
    plain = client.completions.create(model="fake-model", prompt="x 995", max_tokens=20)
    assert (plain.choices[0].finish_reason, plain.choices[0].model_extra["stop_reason"]) == ("stop", None)
    stop = fakes.word_id("assistant") + 2   # the chat prompt ends with it: the second generated token
    chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=20, extra_body={"stop_token_ids": [stop]}, stream=True)
    last = [c.choices[0] for c in chat if c.choices][-1]
    assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop)


def test_logit_bias_reaches_prefill_and_decode(gateway, stack):
    gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=3,
                                        logit_bias={"41": 100, "7": -100.0})
    [prefill] = stack.prefill.requests
    [decode] = stack.decode.requests
    for request in (prefill, decode):
        assert dict(request.sampling_params.logit_bias) == {41: 100.0, 7: -100.0}
