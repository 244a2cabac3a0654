"""The Hermes / Qwen tool-call format: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one or more,
text before them being the message's content (vLLM's `hermes` parser reads the same).

Streamed like OpenAI: content until a call starts; then the call's id and name as soon as its name is complete;
then its arguments as they arrive, the exact JSON text the model wrote. A call whose JSON does not begin with
`"name"` then `"arguments"` is held until its end tag and parsed whole (arguments re-serialized); a block that
is not a call at all goes to the content as it was written, counted and logged. Whitespace between content and
a tag is dropped, so `\\n<tool_call>` leaves no content behind.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Optional

from splitserve.services.gateway import metrics
from splitserve.services.gateway.tool_parsers.base import MessageDelta, ToolCallDelta, ToolParser

log = logging.getLogger(__name__)

START, END = "<tool_call>", "</tool_call>"
# The head of a call written in the usual order, up to the first character of its arguments' value.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')

_CONTENT, _HEAD_STATE, _ARGUMENTS, _TAIL = "content", "head", "arguments", "tail"


class HermesToolParser(ToolParser):
    name = "hermes"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._state = _CONTENT
        self._pending = ""                       # received, not yet emitted or dropped
        self._head_tried = True                  # False once a head failed to decode: wait for the end tag
        self._value: Optional[_JsonValue] = None

    def feed(self, text: str) -> MessageDelta:
        self._pending += text
        out = MessageDelta()
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> MessageDelta:
        out = MessageDelta()
        while self._step(out, final=True):
            pass
        if self._state == _ARGUMENTS:
            _failed("unterminated", "the output ended inside a tool call's arguments")
        self._pending = ""
        return out

    def _step(self, out: MessageDelta, final: bool) -> bool:
        """Handles what the current state can decide; True when it moved on to another state."""
        if self._state == _CONTENT:
            return self._content(out, final)
        if self._state == _HEAD_STATE:
            return self._head(out, final)
        if self._state == _ARGUMENTS:
            return self._arguments(out)
        return self._tail()

    def _content(self, out: MessageDelta, final: bool) -> bool:
        start = self._pending.find(START)
        if start >= 0:
            out.content += self._pending[:start].rstrip()
            self._pending = self._pending[start + len(START):]
            self._state, self._head_tried = _HEAD_STATE, True
            return True
        if final:
            # After a call, trailing whitespace alone is no content.
            if not (self.num_calls and not self._pending.strip()):
                out.content += self._pending
            self._pending = ""
            return False
        shown = len(self._pending) - _held_back(self._pending)
        out.content += self._pending[:shown]
        self._pending = self._pending[shown:]
        return False

    def _head(self, out: MessageDelta, final: bool) -> bool:
        match = _HEAD.match(self._pending) if self._head_tried else None
        if match is not None:
            try:
                name = json.loads(match.group(1))
            except ValueError:
                self._head_tried = False         # not a JSON string: the whole block decides, at its end
                return True
            out.add_call(self.start_call(name))
            self._pending = self._pending[match.end():]
            self._state, self._value = _ARGUMENTS, _JsonValue()
            return True
        end = self._pending.find(END)
        if end < 0 and not final:
            return False
        block = self._pending if end < 0 else self._pending[:end]
        self._pending = "" if end < 0 else self._pending[end + len(END):]
        self._whole_block(block, closed=end >= 0, out=out)
        self._state = _CONTENT
        return end >= 0

    def _whole_block(self, block: str, closed: bool, out: MessageDelta) -> None:
        """A block not in the usual order, or not a call: parsed whole, or passed on as content."""
        try:
            call: Any = json.loads(block)
        except ValueError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", call.get("parameters", {}))
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            out.add_call(self.start_call(call["name"]))
            out.add_call(_continued(self.num_calls - 1, text))
            return
        _failed("invalid_json", f"a {START} block is not a JSON object with a name; returned as content")
        out.content += START + block + (END if closed else "")

    def _arguments(self, out: MessageDelta) -> bool:
        assert self._value is not None
        used, done = self._value.scan(self._pending)
        if used:
            out.add_call(_continued(self.num_calls - 1, self._pending[:used]))
            self._pending = self._pending[used:]
        if done:
            self._state = _TAIL
        return done

    def _tail(self) -> bool:
        """After the arguments: the rest of the call's JSON is dropped up to its end tag (or the next call's start,
        when the end tag is missing)."""
        ends = [(i, tag) for tag in (END, START) if (i := self._pending.find(tag)) >= 0]
        if not ends:
            return False
        i, tag = min(ends)
        self._pending = self._pending[i + len(tag):]
        self._state, self._head_tried = (_CONTENT, True) if tag == END else (_HEAD_STATE, True)
        return True


def _continued(index: int, arguments: str) -> ToolCallDelta:
    return ToolCallDelta(index, arguments=arguments)


def _held_back(text: str) -> int:
    """How many trailing characters must wait: a possible start of START, and the whitespace before it (dropped
    if a call follows)."""
    partial = next((k for k in range(min(len(text), len(START) - 1), 0, -1) if START.startswith(text[-k:])), 0)
    rest = text[:len(text) - partial]
    return partial + len(rest) - len(rest.rstrip())


def _failed(reason: str, why: str) -> None:
    metrics.TOOL_CALL_PARSE_FAILURES.labels("hermes", reason).inc()
    log.info("tool call parser hermes: %s", why)


class _JsonValue:
    """Finds where one JSON value ends, across pieces: tracks strings, escapes and nesting. A `<` outside a
    string cannot be JSON: it is the end tag of a call whose arguments were cut short."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False
        self.primitive = False

    def scan(self, text: str) -> tuple[int, bool]:
        """(characters of `text` that belong to the value, whether the value ended)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1, True
                continue
            if not self.started:
                self.started = True
                if ch in "{[":
                    self.depth = 1
                elif ch == '"':
                    self.in_string = True
                else:
                    self.primitive = True
                continue
            if self.primitive:
                if ch in ",}] \t\r\n<":
                    return i, True
                continue
            if ch == "<":
                return i, True
            if ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
            elif ch == '"':
                self.in_string = True
        return len(text), False
