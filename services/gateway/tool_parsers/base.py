"""What every tool-call parser shares: the deltas it emits, its incremental interface, and their assembly.

A parser reads a choice's output text piece by piece (feed) and then its end (finish), and emits the message's
parts as deltas: content text, and tool calls (a call's first delta carries its id and function name, later
ones fragments of its arguments). Non-streamed responses run the same parser over the whole text at once and
assemble its deltas, so a streamed response's deltas reassemble to exactly the non-streamed message, wherever
the pieces were cut (a parser's decisions depend on the text only, never on where a piece ended).
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    index: int                                   # the call's position in the message's tool_calls
    id: Optional[str] = None                     # on a call's first delta, with its name
    name: Optional[str] = None
    arguments: str = ""                          # the next fragment of the arguments' JSON text

    def json(self) -> dict[str, Any]:
        """OpenAI's streamed shape: index always; id, type and name on the first delta; arguments after."""
        delta: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {}
        if self.id is not None:
            delta.update(id=self.id, type="function")
            function["name"] = self.name
        function["arguments"] = self.arguments
        delta["function"] = function
        return delta


@dataclass
class MessageDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def add(self, other: "MessageDelta") -> "MessageDelta":
        self.content += other.content
        for call in other.tool_calls:
            self.add_call(call)
        return self

    def add_call(self, call: ToolCallDelta) -> None:
        """Appends a call delta, joined to the previous one when it only continues the same call's arguments
        (one chunk carries one delta per call)."""
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == call.index and call.id is None:
            last.arguments += call.arguments
        else:
            self.tool_calls.append(ToolCallDelta(call.index, call.id, call.name, call.arguments))


class ToolParser(ABC):
    """One choice's output text → content and tool calls, incrementally. One instance per choice."""

    name = ""

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self._new_id = new_id
        self.num_calls = 0

    @abstractmethod
    def feed(self, text: str) -> MessageDelta:
        """The next piece of output text; returns what can be shown of it now."""

    @abstractmethod
    def finish(self) -> MessageDelta:
        """The output ended; returns whatever was held back. Call once, after the last feed."""

    def start_call(self, name: str, arguments: str = "") -> ToolCallDelta:
        """The first delta of the next tool call."""
        self.num_calls += 1
        return ToolCallDelta(self.num_calls - 1, id=self._new_id(), name=name, arguments=arguments)


@dataclass
class ParsedMessage:
    content: Optional[str]
    tool_calls: list[dict[str, Any]]             # OpenAI's message.tool_calls entries


def assemble(deltas: Iterable[MessageDelta]) -> ParsedMessage:
    """The message a sequence of deltas describes (what a client does with a stream)."""
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        content += delta.content
        for call in delta.tool_calls:
            if call.id is not None:
                calls[call.index] = {"id": call.id, "type": "function",
                                     "function": {"name": call.name, "arguments": ""}}
            calls[call.index]["function"]["arguments"] += call.arguments
    return ParsedMessage(content or None, [calls[i] for i in sorted(calls)])


def parse_whole(parser: ToolParser, text: str) -> ParsedMessage:
    """A whole output at once, for non-streamed responses: the same deltas as a stream, assembled."""
    return assemble([parser.feed(text), parser.finish()])
