"""POST /v1/chat/completions: the chat template is the tokenizer's, the shapes are OpenAI's."""

from __future__ import annotations

from . import fakes

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


def _expected(max_tokens: int) -> str:
    prompt = fakes.tokenize_chat([(m["role"], m["content"]) for m in MESSAGES])
    return fakes.decode_text(fakes.expected_tokens(prompt, max_tokens))


def test_chat_completion(gateway, stack):
    result = gateway.openai().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=4)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == _expected(4)
    assert choice.finish_reason == "length"
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    prompt = fakes.tokenize_chat([(m["role"], m["content"]) for m in MESSAGES])
    assert result.usage.prompt_tokens == len(prompt)
    assert list(stack.prefill.requests[0].prompt_token_ids) == prompt


def test_chat_stream_opens_with_the_role_and_ends_with_usage(gateway):
    chunks = list(gateway.openai().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_completion_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == _expected(4)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_chat_n2_stream_opens_every_choice(gateway):
    chunks = list(gateway.openai().chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=3, n=2, seed=1, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    for index in (0, 1):
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].index == index]
        assert finishes[-1] == "length"


def test_chat_without_max_tokens_may_fill_the_context(make_stack):
    stack = make_stack(tokenizer={"max_context_length": 40})
    gateway = stack.start_gateway()
    result = gateway.openai().chat.completions.create(model="fake-model", messages=MESSAGES)
    prompt_len = result.usage.prompt_tokens
    assert stack.prefill.requests[0].sampling_params.max_tokens == 40 - prompt_len
    assert result.usage.completion_tokens <= 40 - prompt_len


def test_chat_logprobs(gateway):
    result = gateway.openai().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2,
                                                      logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == 2
    first = content[0]
    assert first.logprob == -0.5
    assert first.bytes == list(first.token.encode())
    assert len(first.top_logprobs) == 2 and first.top_logprobs[0].token == first.token


def test_chat_logprob_bytes_are_the_tokens_real_bytes(gateway):
    # Fake ids ending in 7 and 8 are the two bytes of "é": alone each shows U+FFFD, but its bytes are its own.
    result = gateway.openai().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=10,
                                                      logprobs=True, top_logprobs=2)
    content, entries = result.choices[0].message.content, result.choices[0].logprobs.content
    assert content == _expected(10) and content.endswith("é")
    first, second = entries[-2:]
    assert (first.token, first.bytes) == ("\ufffd", [0xC3])
    assert (second.token, second.bytes) == ("\ufffd", [0xA9])
    assert bytes(b for entry in entries for b in entry.bytes).decode() == content
    assert entries[0].top_logprobs[1].bytes == list(entries[0].top_logprobs[1].token.encode())


def test_chat_content_parts_are_joined(gateway):
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             MESSAGES[1]]
    result = gateway.openai().chat.completions.create(model="fake-model", messages=parts, max_tokens=4)
    assert result.choices[0].message.content == _expected(4)
