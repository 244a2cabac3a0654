"""What a request produces: per-sequence events while it runs, whole sequences and usage at the end."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from splitserve.v1 import common_pb2


@dataclass
class SequenceEvent:
    """New output of one of the n sequences."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob]             # parallel to token_ids when logprobs were asked for
    finish_reason: Optional[str] = None                 # on the sequence's last event
    stop: Union[str, int, None] = None                  # the stop string or stop token id that ended it
    usage: Optional[common_pb2.Usage] = None            # on the last event
    error: Optional[Exception] = None                   # why, when finish_reason == "error"
    # On the sequence's first event when prompt logprobs were asked for: one per prompt token (the first has none)
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class SequenceResult:
    """A whole sequence, for responses that are not streamed."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop: Union[str, int, None] = None
    usage: Optional[common_pb2.Usage] = None
    error: Optional[Exception] = None
    prompt_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


async def collect(events: AsyncIterator[SequenceEvent], n: int) -> list[SequenceResult]:
    """The whole sequences, for non-streamed responses."""
    results = [SequenceResult(i) for i in range(n)]
    async with contextlib.aclosing(events):
        async for event in events:
            result = results[event.index]
            result.text += event.text
            result.token_ids += event.token_ids
            result.logprobs += event.logprobs
            result.prompt_logprobs += event.prompt_logprobs
            if event.finish_reason is not None:
                result.finish_reason, result.stop = event.finish_reason, event.stop
                result.usage, result.error = event.usage, event.error
    return results


def total_usage(prompt_tokens: int, usages: list[Optional[common_pb2.Usage]]) -> common_pb2.Usage:
    """The request's usage: the prompt counted once (as OpenAI bills n > 1), completions summed, and as cached
    the prompt tokens every one of the n sub-requests reused."""
    known = [u for u in usages if u is not None]
    return common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(u.completion_tokens for u in known),
                            cached_tokens=min((u.cached_tokens for u in known), default=0))
