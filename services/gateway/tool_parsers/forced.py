"""tool_choice `required` and named: the output is made to be tool calls by guided decoding, as vLLM does it.

The request's structured output is a JSON schema: for a named function, that function's parameters (the whole
output is its arguments); for `required`, an array of at least one {"name", "parameters"} object, one schema per
tool (anyOf), at most one item when parallel_tool_calls is false. The parsers here turn that JSON into tool
calls; they do not depend on the model's own tool-call format (the Hermes parser and the like are for `auto`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from splitserve.services.gateway import metrics
from splitserve.services.gateway.tool_parsers.base import MessageDelta, ToolCallDelta, ToolParser

log = logging.getLogger(__name__)

# A function without parameters takes an empty object (OpenAI's default).
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def parameters_schema(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or EMPTY_PARAMETERS


def required_schema(functions: list[dict[str, Any]], parallel_tool_calls: bool = True) -> dict[str, Any]:
    """The JSON schema of `required`'s output: a non-empty array of calls to the given functions (OpenAI's
    `function` objects: name, parameters)."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [f["name"]]}, "parameters": parameters_schema(f)},
              "required": ["name", "parameters"]} for f in functions]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


class NamedToolParser(ToolParser):
    """The whole output is the arguments of one call to `function`: streamed as they come."""

    name = "named"

    def __init__(self, function: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.function = function

    def feed(self, text: str) -> MessageDelta:
        out = MessageDelta()
        if not self.num_calls:
            out.add_call(self.start_call(self.function))
        if text:
            out.add_call(ToolCallDelta(0, arguments=text))
        return out

    def finish(self) -> MessageDelta:
        return self.feed("")


class RequiredToolParser(ToolParser):
    """The output is a JSON array of {"name", "parameters"}: parsed whole at the end, each item one call (its
    arguments re-serialized). Output that is not such an array (cut short by max_tokens) is returned as content,
    counted and logged."""

    name = "required"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._text = ""

    def feed(self, text: str) -> MessageDelta:
        self._text += text
        return MessageDelta()

    def finish(self) -> MessageDelta:
        out = MessageDelta()
        calls = _calls(self._text)
        if calls is None:
            metrics.TOOL_CALL_PARSE_FAILURES.labels("required", "invalid_json").inc()
            log.info("tool_choice required: the output is not a JSON array of calls; returned as content")
            out.content = self._text
            return out
        for name, arguments in calls:
            out.add_call(self.start_call(name))
            out.add_call(ToolCallDelta(self.num_calls - 1, arguments=json.dumps(arguments, ensure_ascii=False)))
        return out


def _calls(text: str) -> Optional[list[tuple[str, Any]]]:
    try:
        items = json.loads(text)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append((item["name"], item.get("parameters", {})))
    return calls
