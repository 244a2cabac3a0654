"""The gateway's span of one prompt's generation, named and attributed as the OpenTelemetry GenAI semantic
conventions say (`chat <model>`, gen_ai.request.model, gen_ai.usage.input_tokens, ...).

The workers' calls made while it runs (route, prefill, decode) are its children, so a trace shows one prompt's
hops under one span; the tokenizer call comes before it, under the request's own server span.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, AsyncIterator

from splitserve.serving import tracing
from splitserve.services.gateway.outputs import SequenceEvent, total_usage

if TYPE_CHECKING:
    from splitserve.services.gateway.pipeline import PreparedRequest


def traced_generation(request: PreparedRequest, events: AsyncIterator[SequenceEvent]) -> AsyncIterator[SequenceEvent]:
    """`events`, under a generation span when tracing is on; `events` itself when it is off."""
    if not tracing.enabled():
        return events
    operation = "chat" if request.chat else "text_completion"
    params = request.params
    return tracing.traced_steps(f"{operation} {request.model}", {
        "gen_ai.operation.name": operation, "gen_ai.request.model": request.model,
        tracing.REQUEST_ID_ATTRIBUTE: request.request_id,
        "gen_ai.usage.input_tokens": len(request.prompt_token_ids), "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature, "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.choice.count": params.n}, lambda span: _recorded(span, request, events))


async def _recorded(span: tracing.Span, request: PreparedRequest,
                    events: AsyncIterator[SequenceEvent]) -> AsyncIterator[SequenceEvent]:
    """Passes `events` on; marks the first token and, at the end, records usage and finish reasons."""
    usages, reasons = {}, {}
    first_token_seen = False
    async with contextlib.aclosing(events):
        async for event in events:
            if event.token_ids and not first_token_seen:
                first_token_seen = True
                span.add_event("first_token")   # TTFT, read off the trace
            if event.finish_reason is not None:
                usages[event.index], reasons[event.index] = event.usage, event.finish_reason
            yield event
    usage = total_usage(len(request.prompt_token_ids), list(usages.values()))
    span.set_attributes({"gen_ai.usage.output_tokens": usage.completion_tokens,
                         "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
                         "gen_ai.response.finish_reasons": [reasons[index] for index in sorted(reasons)]})
