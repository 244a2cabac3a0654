"""Tool calling through the stack the launcher starts (disaggregated: prefill and decode workers, Envoy), with the
official `openai` client, on a tiny chat model whose template renders tools the Hermes way.

The model's weights are random, so with tool_choice auto it writes no tool call of its own: the Hermes parser is
tested on real Hermes text at unit level (tests/services/gateway/test_tool_parsers.py); here auto is checked to
pass the tools to the template and to stream what it returns whole. tool_choice required and named functions are
enforced by guided decoding, which makes even this model call the tools: the end-to-end check of tool calls.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from e2e_stack import API_KEY, wait_until_pools_whole
from splitserve.launcher.stack import Stack
from tool_chat_model import tool_turns, with_tool_template

pytestmark = pytest.mark.timeout(300)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                   "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
TOOLS = [WEATHER, TIME]
MESSAGES = [{"role": "system", "content": "You help with the weather."},
            {"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_ckpt(llama_ckpt, tmp_path_factory):
    return with_tool_template(llama_ckpt, tmp_path_factory.mktemp("tool-chat") / "tool-llama")


@pytest.fixture(scope="module")
def stack(tool_ckpt, tmp_path_factory):
    with Stack(model=str(tool_ckpt), prefill_workers=1, decode_workers=1, api_key=API_KEY, torch_threads=1,
               num_kv_blocks=256, local_prefill_threshold=0, tool_call_parser="hermes",
               log_dir=str(tmp_path_factory.mktemp("tool-stack-logs"))) as running:
        yield running


def _streamed_message(chunks) -> tuple[str, list[dict], str]:
    """(content, tool calls without their ids, finish_reason) as a client reassembles a stream."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                if call.id is not None:
                    assert call.index not in calls and call.type == "function"
                    calls[call.index] = {"name": call.function.name, "arguments": ""}
                calls[call.index]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def _message(response) -> tuple[str, list[dict], str]:
    choice = response.choices[0]
    calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls or []]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls or [])
    return choice.message.content or "", calls, choice.finish_reason


def test_the_template_renders_the_tools(stack, tool_ckpt, model_id):
    """/tokenize with tools: the ids are the offline template's rendering of messages and tools."""
    reference = AutoTokenizer.from_pretrained(str(tool_ckpt))
    rendered = reference.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tools>" in rendered and '"get_weather"' in rendered
    reply = httpx.post(stack.base_url.removesuffix("/v1") + "/tokenize", timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": model_id, "messages": MESSAGES, "tools": TOOLS})
    assert reply.status_code == 200, reply.text
    assert reply.json()["tokens"] == reference.encode(rendered, add_special_tokens=False)


def test_auto_streams_what_it_returns_whole_and_counts_the_tools_in_the_prompt(client, model_id):
    create = dict(model=model_id, messages=MESSAGES, tools=TOOLS, max_tokens=24, temperature=0.0)
    whole = client.chat.completions.create(**create)
    plain = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=24, temperature=0.0)
    assert whole.usage.prompt_tokens > plain.usage.prompt_tokens      # the tools are in the prompt
    assert _streamed_message(client.chat.completions.create(**create, stream=True)) == _message(whole)


def test_tool_turns_of_a_conversation_are_accepted(client, model_id):
    history = [*MESSAGES, *tool_turns("call_abc", "get_weather", {"city": "Paris", "unit": "celsius"}, "sunny")]
    response = client.chat.completions.create(model=model_id, messages=history, tools=TOOLS, tool_choice="none",
                                              max_tokens=4, temperature=0.0)
    assert response.choices[0].message.tool_calls is None and response.usage.completion_tokens >= 1


@pytest.mark.parametrize("extra,error", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "not in tools"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "letters"),
])
def test_bad_tool_requests_are_400(client, model_id, extra, error):
    with pytest.raises(openai.BadRequestError, match=error):
        client.chat.completions.create(**{"model": model_id, "messages": MESSAGES, "tools": TOOLS, **extra})


def _check_calls(calls: list[dict], allowed: list[dict]) -> None:
    import jsonschema

    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in allowed}
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_makes_the_model_call_a_tool(client, model_id, stack, temperature):
    create = dict(model=model_id, messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                  max_tokens=200, temperature=temperature, seed=7)
    whole = _message(client.chat.completions.create(**create))
    content, calls, finish = whole
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    _check_calls(calls, TOOLS)
    assert _streamed_message(client.chat.completions.create(**create, stream=True)) == whole
    assert wait_until_pools_whole(stack)[0]


def test_a_named_function_is_called_with_valid_arguments(client, model_id):
    create = dict(model=model_id, messages=MESSAGES, tools=TOOLS, max_tokens=200, temperature=0.0,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = _message(client.chat.completions.create(**create))
    content, calls, finish = whole
    assert finish == "tool_calls" and content == "" and [c["name"] for c in calls] == ["get_time"]
    _check_calls(calls, [TIME])
    assert _streamed_message(client.chat.completions.create(**create, stream=True)) == whole


def test_auto_parses_a_hermes_call_the_model_writes(client, model_id):
    """A regex holds the random model to a Hermes tool call (one city of three): the hermes parser turns it into
    a tool call, streamed deltas and the whole response alike."""
    regex = (r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Oslo|Lima)", '
             r'"unit": "celsius"\}\}\n</tool_call>')
    create = dict(model=model_id, messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=120,
                  temperature=0.0, extra_body={"structured_outputs": {"regex": regex}})
    whole = _message(client.chat.completions.create(**create))
    content, calls, finish = whole
    assert content == "Checking." and finish == "tool_calls" and [c["name"] for c in calls] == ["get_weather"]
    _check_calls(calls, TOOLS)
    assert _streamed_message(client.chat.completions.create(**create, stream=True)) == whole
