"""Structured output in the OpenAI bodies (response_format, vLLM's structured_outputs and guided_* keys): each
reaches the workers as the one SamplingParams.structured_output; two at once, or ones the gateway can tell are
broken, are a 400 naming the field. (Enforcement is the engine's: tests/engine/test_guided.py, tests/e2e/.)"""

from __future__ import annotations

import json

import openai
import pytest

from splitserve.proto_convert import structured_output_from_proto
from splitserve.sampling_params import StructuredOutput

MESSAGES = [{"role": "user", "content": "hi there"}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _sent(stack) -> StructuredOutput:
    """The constraint the prefill worker received with the last request."""
    return structured_output_from_proto(stack.prefill.requests[-1].sampling_params.structured_output)


@pytest.mark.parametrize("extra, expected", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"response_format": {"type": "json_object"}}, StructuredOutput(json_object=True)),
    ({"response_format": {"type": "text"}}, None),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutput(regex="[a-z]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput(choice=("yes", "no"))),
    ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutput(grammar='root ::= "x"')),
    ({"structured_outputs": {"json_object": True}}, StructuredOutput(json_object=True)),
    ({"guided_json": SCHEMA}, StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"guided_regex": "[0-9]"}, StructuredOutput(regex="[0-9]")),
    ({"guided_choice": ["a", "b"]}, StructuredOutput(choice=("a", "b"))),
    ({"guided_grammar": 'root ::= "y"'}, StructuredOutput(grammar='root ::= "y"')),
])
def test_each_form_reaches_the_workers_on_both_endpoints(gateway, stack, extra, expected):
    client = gateway.openai()
    client.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2, extra_body=extra)
    assert _sent(stack) == expected
    client.completions.create(model="fake-model", prompt="x 1", max_tokens=2, extra_body=extra)
    assert _sent(stack) == expected
    # The decode worker gets the same constraint: it replays the first token through it.
    decode = stack.decode.requests[-1].sampling_params.structured_output
    assert structured_output_from_proto(decode) == expected


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "only one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "only one"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not valid JSON"),
    ({"structured_outputs": {"json": "[1, 2]"}}, "structured_outputs", "object"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"structured_outputs": {"regex": "  "}}, "structured_outputs", "non-empty"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens", "grammar decides"),
])
def test_bad_constraints_are_400_naming_the_field(gateway, stack, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.openai().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=2,
                                                 extra_body=extra)
    error = caught.value.body
    assert error["param"] == param and words in error["message"], error
    assert not stack.prefill.requests    # refused before any worker saw it
