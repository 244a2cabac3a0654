"""Chat turns and tools from the wire into the shapes chat templates read (transformers' and vLLM's).

Tool calls and tools travel as JSON text (tokenizer.proto); here they become the dicts templates index into. A
call's `arguments` arrive as a JSON string, as OpenAI sends them, and templates print them with `tojson`: like
vLLM, they are handed over parsed, so the prompt shows the object rather than a quoted string.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from splitserve.sampling_params import InvalidRequestError
from splitserve.v1 import common_pb2


def chat_message(message: common_pb2.ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [_call_for_template(call) for call in _json(message.tool_calls, "messages", list)]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    if message.name:
        turn["name"] = message.name
    return turn


def chat_tools(tools_json: str) -> Optional[list[dict[str, Any]]]:
    """The tools array, or None when the request has none."""
    return _json(tools_json, "tools", list) if tools_json else None


def _call_for_template(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            function = {**function, "arguments": json.loads(function["arguments"])}
        except ValueError:
            pass   # not JSON: the template gets the text as the client sent it
        call = {**call, "function": function}
    return call


def _json(text: str, param: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, kind):
        raise InvalidRequestError(f"{param} must be a JSON {kind.__name__}", param=param)
    return value
