"""Pipeline results in OpenAI's JSON shapes: completions and chat, whole responses and stream chunks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from splitserve.v1 import common_pb2
from splitserve.services.gateway.outputs import SequenceEvent, SequenceResult
from splitserve.services.gateway.tool_parsers import MessageDelta, ToolParser, parse_whole


def usage_json(usage: common_pb2.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@dataclass
class ResponseFormatter:
    """Everything one response's JSON needs besides the pipeline's events; one per request."""
    chat: bool
    request_id: str
    model: str
    want_logprobs: bool
    # Completions' echo with logprobs: the prompt's tokens open `logprobs`, with this many alternatives each.
    echo_logprobs: Optional[int] = None
    # vLLM's prompt_logprobs: each choice's `prompt_logprobs` list, with this many alternatives per token.
    prompt_logprobs: Optional[int] = None
    created: int = field(default_factory=lambda: int(time.time()))
    # Chat with tools: makes the parser that finds each choice's tool calls in its text (None: text is content).
    tool_parser: Optional[Callable[[], ToolParser]] = None
    # Completions report each token's offset in the sequence's text; kept per sequence across chunks.
    _text_offsets: dict[int, int] = field(default_factory=dict)
    _tool_parsers: dict[int, ToolParser] = field(default_factory=dict)   # streams: one per choice

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.request_id

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, results: list[SequenceResult], usage: common_pb2.Usage) -> dict[str, Any]:
        choices = []
        for result in results:
            choice: dict[str, Any] = {"index": result.index,
                                      "logprobs": self._logprobs(result.index, result.logprobs,
                                                                 result.prompt_logprobs),
                                      "finish_reason": result.finish_reason, "stop_reason": result.stop}
            if self.prompt_logprobs is not None:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(result.prompt_logprobs, self.prompt_logprobs)
            if self.chat and self.tool_parser is not None:
                parsed = parse_whole(self.tool_parser(), result.text)
                choice["message"] = {"role": "assistant", "content": parsed.content}
                if parsed.tool_calls:
                    choice["message"]["tool_calls"] = parsed.tool_calls
                    choice["finish_reason"] = _with_tool_calls(result.finish_reason)
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choices.append(choice)
        return {**self._envelope(chunk=False), "choices": choices, "usage": usage_json(usage)}

    def role_chunk(self, index: int, include_usage: bool) -> dict[str, Any]:
        """Chat streams open each choice with the assistant role, as OpenAI's do."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._chunk([choice], include_usage)

    def event_chunk(self, event: SequenceEvent, include_usage: bool) -> Optional[dict[str, Any]]:
        """The stream chunk for one event, or None when it carries nothing to show (text held back)."""
        message = self._message_delta(event)
        shows_prompt = bool(event.prompt_logprobs) and (self.prompt_logprobs, self.echo_logprobs) != (None, None)
        if (not message and event.finish_reason is None and not (self.want_logprobs and event.token_ids)
                and not shows_prompt):
            return None
        choice: dict[str, Any] = {"index": event.index,
                                  "logprobs": self._logprobs(event.index, event.logprobs, event.prompt_logprobs),
                                  "finish_reason": event.finish_reason, "stop_reason": event.stop}
        if self.prompt_logprobs is not None and event.prompt_logprobs:   # on each choice's first chunk
            choice["prompt_logprobs"] = _vllm_prompt_logprobs(event.prompt_logprobs, self.prompt_logprobs)
        if self.chat:
            choice["delta"] = {"content": message.content} if message.content else {}
            if message.tool_calls:
                choice["delta"]["tool_calls"] = [call.json() for call in message.tool_calls]
            parser = self._tool_parsers.get(event.index)
            if parser is not None and parser.num_calls:
                choice["finish_reason"] = _with_tool_calls(event.finish_reason)
        else:
            choice["text"] = event.text
        return self._chunk([choice], include_usage)

    def _message_delta(self, event: SequenceEvent) -> MessageDelta:
        """What the event adds to its choice's message: its text, through the choice's tool parser if any."""
        if self.tool_parser is None or not self.chat:
            return MessageDelta(content=event.text)
        parser = self._tool_parsers.get(event.index)
        if parser is None:
            parser = self._tool_parsers[event.index] = self.tool_parser()
        delta = parser.feed(event.text)
        if event.finish_reason is not None:
            delta.add(parser.finish())
        return delta

    def usage_chunk(self, usage: common_pb2.Usage) -> dict[str, Any]:
        return {**self._envelope(chunk=True), "choices": [], "usage": usage_json(usage)}

    def _chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        chunk = {**self._envelope(chunk=True), "choices": choices}
        if include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, index: int, logprobs: list[common_pb2.TokenLogprob],
                  prompt: Sequence[common_pb2.TokenLogprob] = ()) -> Optional[dict[str, Any]]:
        """From the entries as the engine made them: each token's text and bytes travel with it. With echo the
        prompt's tokens come first, the first of them without a logprob (nothing precedes it), as vLLM's do."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [_chat_token(lp) for lp in logprobs]}
        echoed = list(prompt) if self.echo_logprobs is not None else []
        entries = echoed + list(logprobs)
        offset = self._text_offsets.get(index, 0)
        offsets = []
        for lp in entries:
            offsets.append(offset)
            offset += len(lp.token)
        self._text_offsets[index] = offset
        k = [self.echo_logprobs] * len(echoed) + [None] * len(logprobs)
        token_logprobs = [lp.logprob for lp in entries]
        top_logprobs: list[Optional[dict[str, float]]] = [{t.token: t.logprob for t in lp.top[:limit]}
                                                          for lp, limit in zip(entries, k)]
        if echoed:
            token_logprobs[0] = top_logprobs[0] = None
        return {"tokens": [lp.token for lp in entries], "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}


def _vllm_prompt_logprobs(entries: Sequence[common_pb2.TokenLogprob], k: int) -> Optional[list[Any]]:
    """vLLM's shape: null for the first token, then {token id: {logprob, rank, decoded_token}} holding the prompt
    token and its k alternatives (rank: 1 for the most likely; null for a prompt token outside the top k)."""
    if not entries:
        return None
    out: list[Any] = [None]
    for lp in entries[1:]:
        entry = {str(t.token_id): {"logprob": t.logprob, "rank": rank, "decoded_token": t.token}
                 for rank, t in enumerate(lp.top[:k], start=1)}
        entry.setdefault(str(lp.token_id), {"logprob": lp.logprob, "rank": None, "decoded_token": lp.token})
        out.append(entry)
    return out


def _with_tool_calls(finish_reason: Optional[str]) -> Optional[str]:
    """A message with tool calls that ended normally finished to call them (OpenAI's "tool_calls"); cut short
    ("length") it says so."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _chat_token(lp: common_pb2.TokenLogprob) -> dict[str, Any]:
    def entry(entry_lp) -> dict[str, Any]:
        return {"token": entry_lp.token, "logprob": entry_lp.logprob, "bytes": list(entry_lp.token_bytes)}

    return {**entry(lp), "top_logprobs": [entry(t) for t in lp.top]}
