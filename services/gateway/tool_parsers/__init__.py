"""Tool calls in a chat completion's output: one parser per format, chosen by the gateway's --tool-call-parser
(as vLLM's flag) for tool_choice `auto`; `required` and named functions use guided decoding and forced.py."""

from __future__ import annotations

from splitserve.services.gateway.tool_parsers.base import (MessageDelta, ParsedMessage, ToolCallDelta, ToolParser,
                                                           assemble, parse_whole)
from splitserve.services.gateway.tool_parsers.hermes import HermesToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {parser.name: parser for parser in (HermesToolParser,)}

__all__ = ["TOOL_PARSERS", "MessageDelta", "ParsedMessage", "ToolCallDelta", "ToolParser", "assemble",
           "parse_whole"]
