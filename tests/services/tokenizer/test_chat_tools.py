"""Tools and tool turns from the wire to the chat template: the template sees the tools, an assistant turn's
calls (arguments parsed, as templates print them with tojson) and a tool turn's call id; bad JSON is a 400."""

from __future__ import annotations

import json

import pytest

from splitserve.demo_model import build_tokenizer
from splitserve.sampling_params import InvalidRequestError
from splitserve.services.tokenizer.chat_messages import chat_message, chat_tools
from splitserve.services.tokenizer.tokenizer_model import TokenizerModel
from splitserve.v1 import common_pb2
from tool_chat_model import HERMES_TEMPLATE

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tool-chat-model")
    build_tokenizer(path)
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return TokenizerModel.load(str(path))


def test_tools_and_tool_turns_are_rendered_by_the_template(model):
    wire = [common_pb2.ChatMessage(role="user", content="Weather in Paris?"),
            common_pb2.ChatMessage(role="assistant", tool_calls=json.dumps(CALLS)),
            common_pb2.ChatMessage(role="tool", content="sunny", tool_call_id="call_1", name="get_weather")]
    messages = [chat_message(m) for m in wire]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2]["tool_call_id"] == "call_1" and messages[2]["name"] == "get_weather"
    ids, rendered = model.encode_chat(messages, add_generation_prompt=True, tools=chat_tools(json.dumps([WEATHER])))
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in rendered
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered and rendered.endswith("<|im_start|>assistant\n")
    assert ids == model.tokenizer.encode(rendered, add_special_tokens=False)
    # without tools, the same template renders the plain conversation
    _, plain = model.encode_chat(messages[:1], add_generation_prompt=True, tools=chat_tools(""))
    assert plain == "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"


def test_arguments_that_are_not_json_reach_the_template_as_sent():
    calls = [{**CALLS[0], "function": {"name": "f", "arguments": "not json"}}]
    message = chat_message(common_pb2.ChatMessage(role="assistant", tool_calls=json.dumps(calls)))
    assert message["tool_calls"][0]["function"]["arguments"] == "not json"


@pytest.mark.parametrize("make,param", [
    (lambda: chat_tools("{not json"), "tools"),
    (lambda: chat_tools('{"type": "function"}'), "tools"),
    (lambda: chat_message(common_pb2.ChatMessage(role="assistant", tool_calls="[oops")), "messages"),
])
def test_bad_json_is_an_invalid_request(make, param):
    with pytest.raises(InvalidRequestError) as caught:
        make()
    assert caught.value.param == param
