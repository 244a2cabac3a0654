"""Tool-call parsers at unit level: the Hermes format non-streamed and streamed (every chunk boundary gives the
same message), the JSON of tool_choice required/named, and the schema guided decoding gets for them."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from splitserve.services.gateway.tool_parsers import TOOL_PARSERS, assemble, parse_whole
from splitserve.services.gateway.tool_parsers.forced import NamedToolParser, RequiredToolParser, required_schema
from splitserve.services.gateway.tool_parsers.hermes import HermesToolParser


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def call(i, name, arguments):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}


def whole(text, parser_class=HermesToolParser, *args):
    parsed = parse_whole(parser_class(*args, new_id=ids()), text)
    return parsed.content, parsed.tool_calls


def streamed(pieces, parser_class=HermesToolParser, *args):
    parser = parser_class(*args, new_id=ids())
    parsed = assemble([*(parser.feed(p) for p in pieces), parser.finish()])
    return parsed.content, parsed.tool_calls


WEATHER = '{"city": "Paris", "unit": "celsius"}'
HERMES_CASES = [
    # (model output, content, tool calls)
    ("Hello, world.", "Hello, world.", []),
    ("a < b and <tool but not a call", "a < b and <tool but not a call", []),
    (f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>', None,
     [call(0, "get_weather", WEATHER)]),
    (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
     f'<tool_call>\n{{"name": "get_time", "arguments": {{"tz": "CET"}}}}\n</tool_call>\n', "Let me check.",
     [call(0, "get_weather", WEATHER), call(1, "get_time", '{"tz": "CET"}')]),
    # braces, escapes and a tag inside strings are part of the arguments
    ('<tool_call>{"name": "run", "arguments": {"code": "if x: {\\"a\\": [1, \\"}\\"]} </tool_call>"}}</tool_call>',
     None, [call(0, "run", '{"code": "if x: {\\"a\\": [1, \\"}\\"]} </tool_call>"}')]),
    # other key order: parsed whole, arguments re-serialized
    ('<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>', None, [call(0, "f", '{"x": 1}')]),
    # not a call: the block stays content, as written
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    # text after the calls is content
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone.', "\nDone.", [call(0, "f", "{}")]),
    # cut short (max_tokens): the call keeps the arguments it got
    ('<tool_call>{"name": "f", "arguments": {"q": "unfini', None, [call(0, "f", '{"q": "unfini')]),
    # missing end tag, then another call
    ('<tool_call>{"name": "f", "arguments": {}}\n<tool_call>{"name": "g", "arguments": []}', None,
     [call(0, "f", "{}"), call(1, "g", "[]")]),
    ('<tool_call>{"name": "f", "arguments": "a string"}</tool_call>', None, [call(0, "f", '"a string"')]),
    ("", None, []),
    ("  \n", "  \n", []),
]


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_whole_output(text, content, calls):
    assert whole(text) == (content, calls)


@pytest.mark.parametrize("text,content,calls", HERMES_CASES)
def test_hermes_stream_cut_anywhere_reassembles_to_the_whole(text, content, calls):
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]]) == (content, calls), cut
    assert streamed(list(text)) == (content, calls)
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), 5)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert streamed(pieces) == (content, calls)


def test_hermes_streams_name_first_then_arguments_as_they_come():
    parser = HermesToolParser(new_id=ids())
    first = parser.feed('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": ')
    assert first.content == "Sure."
    assert first.tool_calls == []               # the arguments' first character is not there yet
    started = parser.feed('{"city": ')
    assert [c.json() for c in started.tool_calls] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": '}}]
    more = parser.feed('"Paris"}}\n</tool')
    assert [c.json() for c in more.tool_calls] == [{"index": 0, "function": {"arguments": '"Paris"}'}}]
    assert not parser.feed("_call>") and not parser.finish()


def test_content_is_held_back_only_while_it_may_start_a_call():
    parser = HermesToolParser()
    assert parser.feed("x <tool").content == "x"
    assert parser.feed("box").content == " <toolbox"


def test_registry_names_the_hermes_parser():
    assert TOOL_PARSERS["hermes"] is HermesToolParser


def test_named_output_is_the_arguments_of_one_call():
    text = '{"city": "Paris"}'
    assert whole(text, NamedToolParser, "get_weather") == (None, [call(0, "get_weather", text)])
    for cut in range(len(text) + 1):
        assert streamed([text[:cut], text[cut:]], NamedToolParser, "get_weather") == \
            (None, [call(0, "get_weather", text)])


def test_required_output_array_becomes_calls():
    text = '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]'
    expected = (None, [call(0, "f", '{"a": 1}'), call(1, "g", "{}")])
    assert whole(text, RequiredToolParser) == expected
    assert streamed(list(text), RequiredToolParser) == expected
    # cut short, or not an array of calls: content
    assert whole('[{"name": "f", "param', RequiredToolParser) == ('[{"name": "f", "param', [])
    assert whole('{"name": "f"}', RequiredToolParser) == ('{"name": "f"}', [])


def test_required_schema_is_an_array_of_calls_to_the_given_tools():
    weather = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                      "required": ["city"]}}
    bare = {"name": "ping"}
    schema = required_schema([weather, bare])
    assert schema == {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
        {"type": "object", "properties": {"name": {"type": "string", "enum": ["get_weather"]},
                                          "parameters": weather["parameters"]}, "required": ["name", "parameters"]},
        {"type": "object", "properties": {"name": {"type": "string", "enum": ["ping"]},
                                          "parameters": {"type": "object", "properties": {}}},
         "required": ["name", "parameters"]}]}}
    assert required_schema([bare], parallel_tool_calls=False)["maxItems"] == 1
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "ping", "parameters": {}}],
                        schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "get_weather", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], schema)
    json.dumps(schema)
