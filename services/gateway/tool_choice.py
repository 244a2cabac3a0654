"""A chat request's tools and tool_choice: checked, then turned into what each part of the request needs.

The chat template gets the tools (as JSON text, through the tokenizer service) whatever tool_choice says, as
vLLM does. `auto` parses the output with the gateway's --tool-call-parser (none configured: 400, vLLM's
--enable-auto-tool-choice rule); `required` and a named function constrain the output with guided decoding
(tool_parsers/forced.py) and parse it as JSON; `none` leaves the output as content.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from splitserve.sampling_params import InvalidRequestError, SamplingParams, StructuredOutput
from splitserve.services.gateway.tool_parsers import TOOL_PARSERS, ToolParser
from splitserve.services.gateway.tool_parsers.forced import (NamedToolParser, RequiredToolParser, parameters_schema,
                                                             required_schema)


# OpenAI's rule for function names.
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolChoice:
    functions: tuple[dict[str, Any], ...]        # OpenAI `function` objects: name, description, parameters
    choice: str                                  # "none", "auto", "required" or "function" (named)
    named: Optional[str] = None
    parallel_tool_calls: bool = True

    @classmethod
    def check(cls, functions: list[dict[str, Any]], choice: Optional[str], named: Optional[str],
              parallel_tool_calls: bool, tools_given: bool) -> "ToolChoice":
        if choice is not None and not tools_given:
            raise InvalidRequestError("tool_choice is only allowed when tools are given", "tool_choice")
        if tools_given and not functions:
            raise InvalidRequestError("tools must hold at least one tool", "tools")
        names = [f["name"] for f in functions]
        for i, function in enumerate(functions):
            if not _NAME.fullmatch(function["name"]):
                raise InvalidRequestError(f"tools[{i}].function.name {function['name']!r} must be 1 to 64 letters, "
                                          f"digits, underscores or dashes", "tools")
            parameters = function.get("parameters")
            if parameters is not None and parameters.get("type", "object") != "object":
                raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON Schema of an object",
                                          "tools")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise InvalidRequestError(f"tools names function {duplicates[0]!r} more than once", "tools")
        if named is not None and named not in names:
            raise InvalidRequestError(f"tool_choice names function {named!r}, which is not in tools", "tool_choice")
        if choice is None:
            choice = "auto" if functions else "none"
        return cls(tuple(functions), choice, named, parallel_tool_calls)

    def template_json(self) -> str:
        """The tools for the chat template; "" for none."""
        if not self.functions:
            return ""
        return json.dumps([{"type": "function", "function": f} for f in self.functions], ensure_ascii=False)

    def guided_schema(self) -> Optional[dict[str, Any]]:
        """The JSON schema guided decoding holds the output to, for `required` and a named function."""
        if self.choice == "required":
            return required_schema(list(self.functions), self.parallel_tool_calls)
        if self.choice == "function":
            return parameters_schema(next(f for f in self.functions if f["name"] == self.named))
        return None

    def output_parser(self, auto_parser: Optional[str]) -> Optional[Callable[[], ToolParser]]:
        """Makes one parser per choice, or None when the output is plain content. `auto_parser`: the gateway's
        --tool-call-parser."""
        if self.choice == "function":
            return functools.partial(NamedToolParser, self.named)
        if self.choice == "required":
            return RequiredToolParser
        if self.choice == "auto":
            if auto_parser is None:
                raise InvalidRequestError('tool_choice "auto" (the default when tools are given) needs a tool-call '
                                          'parser, and this server has none (start it with --tool-call-parser); '
                                          'use tool_choice "required", a named function, or "none"', "tool_choice")
            return TOOL_PARSERS[auto_parser]
        return None


def forced_tool_schema(params: SamplingParams, tools: ToolChoice) -> SamplingParams:
    """`params` holding the output to the tool calls `required` or a named function asks for."""
    schema = tools.guided_schema()
    if schema is None:
        return params
    choice = tools.choice if tools.named is None else tools.named
    if params.structured_output is not None:
        raise InvalidRequestError(f'tool_choice "{choice}" sets the output\'s format itself: it cannot be combined '
                                  f'with response_format or structured_outputs', "tool_choice")
    return params.replace(structured_output=StructuredOutput(json_schema=json.dumps(schema)))
