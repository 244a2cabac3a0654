"""Tool calling at the gateway, against the fake workers: tools and tool_choice checked (400s naming the
parameter), the tools and the conversation's tool turns handed to the chat template, `required` and named
functions held to their JSON schema by guided decoding, and the response formatter's tool calls, streamed and
not, equal."""

from __future__ import annotations

import json

import pytest

from splitserve.sampling_params import SamplingParams
from splitserve.services.gateway.openai_format import ResponseFormatter
from splitserve.services.gateway.outputs import SequenceEvent, SequenceResult
from splitserve.services.gateway.tool_parsers.forced import required_schema
from splitserve.services.gateway.tool_parsers.hermes import HermesToolParser
from splitserve.v1 import common_pb2
from tool_chat_model import tool_turns

MESSAGES = [{"role": "user", "content": "weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping"}}


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("extra,param,says", [
    ({"tools": []}, "tools", "at least one"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", ""),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "letters"),
    ({"tools": [PING, PING]}, "tools", "more than once"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools",
     "object"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", ""),
    # no --tool-call-parser: auto (also the default when tools are given) is refused, as vLLM does
    ({"tools": [WEATHER]}, "tool_choice", "--tool-call-parser"),
    ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
])
def test_bad_tools_and_tool_choice_are_400_naming_the_parameter(gateway, extra, param, says):
    with gateway.http_client() as http:
        error = _error(http.post("/v1/chat/completions", json={"model": "fake-model", "messages": MESSAGES,
                                                                **extra}), 400)
    assert error["param"] == param and says in error["message"]
    assert error["type"] == "invalid_request_error"


def test_tools_and_tool_turns_reach_the_chat_template(gateway, stack):
    """tool_choice none: the template still sees the tools (vLLM's default); the output is content."""
    history = [*MESSAGES, *tool_turns("call_1", "get_weather", {"city": "Paris"}, "sunny")]
    result = gateway.openai().chat.completions.create(model="fake-model", messages=history, tools=[WEATHER, PING],
                                                      tool_choice="none", max_tokens=3)
    choice = result.choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason == "length"
    [request] = stack.tokenizer.servicer.chat_requests
    assert json.loads(request.tools) == [WEATHER, PING]
    assistant, tool = request.chat.messages[1], request.chat.messages[2]
    assert json.loads(assistant.tool_calls) == history[1]["tool_calls"] and assistant.content == ""
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "sunny")


def test_auto_with_a_parser_returns_the_text_when_it_holds_no_call(stack):
    gateway = stack.start_gateway(tool_call_parser="hermes")
    client = gateway.openai()
    result = client.chat.completions.create(model="fake-model", messages=MESSAGES, tools=[WEATHER], max_tokens=4)
    plain = client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=4)
    assert result.choices[0].message.content == plain.choices[0].message.content
    assert result.choices[0].message.tool_calls is None and result.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="fake-model", messages=MESSAGES, tools=[WEATHER], max_tokens=4, stream=True))
    assert streamed == plain.choices[0].message.content


def test_settings_refuse_an_unknown_parser(stack):
    with pytest.raises(ValueError, match="tool_call_parser must be one of hermes"):
        stack.start_gateway(tool_call_parser="nope")


@pytest.mark.parametrize("tool_choice,schema", [
    ("required", required_schema([WEATHER["function"], PING["function"]])),
    ({"type": "function", "function": {"name": "get_weather"}}, WEATHER["function"]["parameters"]),
])
def test_required_and_named_are_guided_by_their_json_schema(gateway, stack, tool_choice, schema):
    client = gateway.openai()
    create = dict(model="fake-model", messages=MESSAGES, tools=[WEATHER, PING], tool_choice=tool_choice,
                  max_tokens=3)
    client.chat.completions.create(**create)
    guided = stack.prefill.requests[-1].sampling_params.structured_output
    assert json.loads(guided.json_schema) == schema


def _formatter(parser) -> ResponseFormatter:
    return ResponseFormatter(chat=True, request_id="r", model="m", want_logprobs=False, tool_parser=parser)


@pytest.mark.parametrize("finish,expected_finish", [("stop", "tool_calls"), ("length", "length")])
def test_formatter_streams_tool_call_deltas_that_reassemble_to_the_response(finish, expected_finish):
    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')
    usage = common_pb2.Usage(prompt_tokens=3, completion_tokens=9)
    whole = _formatter(HermesToolParser).response([SequenceResult(0, text, finish_reason=finish)], usage)
    [choice] = whole["choices"]
    message = choice["message"]
    assert message["content"] == "Checking." and choice["finish_reason"] == expected_finish
    assert [(c["type"], c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("function", "get_weather", '{"city": "Paris"}'), ("function", "ping", "{}")]
    assert all(c["id"].startswith("call_") for c in message["tool_calls"])
    for step in (1, 3, 7):
        formatter = _formatter(HermesToolParser)
        pieces = [text[i:i + step] for i in range(0, len(text), step)]
        chunks = [formatter.event_chunk(SequenceEvent(0, piece, [1], [], finish if i == len(pieces) - 1 else None),
                                        include_usage=False) for i, piece in enumerate(pieces)]
        deltas = [c["choices"][0] for c in chunks if c is not None]
        content = "".join(d["delta"].get("content", "") for d in deltas)
        calls: dict[int, dict] = {}
        for d in deltas:
            for call in d["delta"].get("tool_calls", []):
                if "id" in call:
                    assert call["type"] == "function" and call["index"] not in calls
                    calls[call["index"]] = {"name": call["function"]["name"], "arguments": ""}
                else:
                    assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                calls[call["index"]]["arguments"] += call["function"]["arguments"]
        assert content == message["content"]
        assert [calls[i] for i in sorted(calls)] == [c["function"] for c in message["tool_calls"]]
        assert [d["finish_reason"] for d in deltas] == [None] * (len(deltas) - 1) + [expected_finish]


def test_required_with_another_output_format_is_refused():
    from splitserve.sampling_params import InvalidRequestError, StructuredOutput
    from splitserve.services.gateway.tool_choice import ToolChoice, forced_tool_schema

    tools = ToolChoice.check([WEATHER["function"]], "required", None, True, tools_given=True)
    with pytest.raises(InvalidRequestError, match="cannot be combined with response_format"):
        forced_tool_schema(SamplingParams(structured_output=StructuredOutput(json_object=True)), tools)
    assert forced_tool_schema(SamplingParams(), tools).structured_output.json_schema
