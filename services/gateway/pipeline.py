"""One request's lifecycle, shared by the REST and the gRPC API.

prepare(): model check, tokenize, context-length check (all before any byte of a response is written, so
these failures get a proper HTTP status). generate(): n sequences run concurrently, each one: token ids and
their text from the workers (sequence.py; the engines detokenize and match stop strings, so the gateway only
formats) → events with text, ids and, on the last one, usage.

Sequences never leave half-formed: a failure before a sequence produced anything raises (a status for the
whole request); after, the sequence ends with an event whose finish_reason is "error".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence, Union

from splitserve.v1 import common_pb2
from splitserve.sampling_params import SEED_MIN, InvalidRequestError, SamplingParams
from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import (ContextLengthExceededError, GatewayError, RequestTooLargeError,
                                                UpstreamError)
from splitserve.services.gateway.generation_span import traced_generation
from splitserve.services.gateway.outputs import SequenceEvent, total_usage
from splitserve.services.gateway.sequence import SequenceRunner, TokenBatch
from splitserve.services.gateway.served_models import ServedModels
from splitserve.services.gateway.tokenizer_client import ModelInfo, TokenizerClient

log = logging.getLogger(__name__)

MAX_N = 128                     # OpenAI's limit; each of the n sequences is its own request to the workers
# Without --max-prompt-bytes a text prompt may hold 16 bytes per token of the context window: natural text and
# code average 3-5 bytes per token, so a longer prompt cannot fit and is refused before the tokenizer spends
# seconds and hundreds of MiB on it (16 MiB took 16-37 s and 1.1 GiB).
PROMPT_BYTES_PER_TOKEN = 16
_MAX_CLIENT_ID_CHARS = 128


def internal_request_id(client_id: Optional[str] = None) -> str:
    """The id the workers see. Unique even when clients reuse theirs (a worker refuses an id that is already
    running): the client's id, kept for tracing in logs, plus a random suffix."""
    suffix = uuid.uuid4().hex
    return f"{client_id[:_MAX_CLIENT_ID_CHARS]}-{suffix[:12]}" if client_id else suffix


@dataclass
class Prompt:
    """Exactly one of the three."""
    text: Optional[str] = None
    token_ids: Optional[list[int]] = None
    messages: Optional[list[common_pb2.ChatMessage]] = None    # chat template applied by the tokenizer
    tools: str = ""                                     # chat: OpenAI's tools as JSON text, for the template

    @property
    def param(self) -> str:
        return "messages" if self.messages is not None else "prompt"


@dataclass
class GenerationRequest:
    prompt: Prompt
    params: SamplingParams
    model: Optional[str] = None                         # None or "": the served model
    request_id: str = field(default_factory=internal_request_id)
    skip_special_tokens: bool = True
    # Chat without max_tokens: generate up to the end of the context window, as OpenAI does.
    max_tokens_fills_context: bool = False
    echo: bool = False                                  # each choice's text starts with the prompt's
    # max_tokens 0 (with echo): the answer is the prompt alone; the one token prefill must sample is dropped.
    prompt_only: bool = False


@dataclass
class PreparedRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    skip_special_tokens: bool
    arrival: float                                      # event-loop time
    deadline: float
    chat: bool = False                                  # the prompt was chat messages
    echo_text: Optional[str] = None                     # put before each choice's text (echo)
    prompt_only: bool = False


class Pipeline:
    def __init__(self, tokenizer: TokenizerClient, runner: SequenceRunner, served_model_names: Sequence[str] = (),
                 request_timeout_s: float = 600.0, max_prompt_bytes: Optional[int] = None):
        self.tokenizer = tokenizer
        self.runner = runner
        self.served = ServedModels(served_model_names)
        self.request_timeout_s = request_timeout_s
        self.max_prompt_bytes = max_prompt_bytes

    async def served_models(self) -> list[str]:
        return self.served.names((await self.tokenizer.info()).model)

    async def resolve_model(self, requested: Optional[str]) -> tuple[str, ModelInfo]:
        """The served name a request's response carries, and the model's facts; 404 for an unknown name."""
        info = await self.tokenizer.info()
        return self.served.resolve(requested, info.model), info

    async def tokenize(self, prompt: Prompt, info: ModelInfo, add_special_tokens: bool = True,
                       add_generation_prompt: bool = True) -> list[int]:
        """The prompt's ids: text and chat through the tokenizer service (after the byte limit), ids checked
        against the vocabulary."""
        self._check_prompt_bytes(prompt, info.max_context_length)
        if prompt.token_ids is not None:
            check_token_ids(prompt.token_ids, info, prompt.param)
            return list(prompt.token_ids)
        if prompt.messages is not None:
            if not info.has_chat_template:
                raise InvalidRequestError("this model has no chat template; use /v1/completions", "messages")
            return await self.tokenizer.tokenize_chat(prompt.messages, add_generation_prompt, prompt.tools)
        return await self.tokenizer.tokenize_text(prompt.text or "", add_special_tokens)

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        arrival = asyncio.get_running_loop().time()
        if request.params.n > MAX_N:
            raise InvalidRequestError(f"n must be at most {MAX_N}, got {request.params.n}", "n")
        served, info = await self.resolve_model(request.model)
        prompt = request.prompt
        ids = await self.tokenize(prompt, info)
        if not ids:
            raise InvalidRequestError("the prompt is empty", prompt.param)
        params = request.params
        if any(t >= info.vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be below the vocabulary size {info.vocab_size}",
                                      "stop_token_ids")
        check_token_ids(list(params.logit_bias), info, "logit_bias")
        limit = info.max_context_length
        if request.max_tokens_fills_context and len(ids) < limit:
            # Never below min_tokens: a prompt that leaves less room is refused just below, as too long.
            params = params.replace(max_tokens=max(limit - len(ids), params.min_tokens))
        if len(ids) + params.max_tokens > limit:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the {prompt.param}, {params.max_tokens} "
                f"in the completion). Please reduce the length of the {prompt.param} or of the completion.",
                prompt.param)
        metrics.PROMPT_TOKENS.inc(len(ids))
        # The engine makes the text, so it is told how.
        params = params.replace(skip_special_tokens=request.skip_special_tokens)
        echo_text = None
        if request.echo:   # a prompt given as ids is echoed as their text, as vLLM does
            echo_text = prompt.text if prompt.text is not None else await self.tokenizer.detokenize(ids)
        return PreparedRequest(request_id=request.request_id, model=served, prompt_token_ids=ids, params=params,
                               skip_special_tokens=request.skip_special_tokens, arrival=arrival,
                               deadline=arrival + self.request_timeout_s, chat=prompt.messages is not None,
                               echo_text=echo_text, prompt_only=request.prompt_only)

    async def prepare_batch(self, requests: list[GenerationRequest]) -> list[PreparedRequest]:
        """Every prompt of a batch prepared (tokenized concurrently) before any is generated: one bad prompt
        fails the whole request with its status."""
        return list(await asyncio.gather(*(self.prepare(request) for request in requests)))

    def _check_prompt_bytes(self, prompt: Prompt, max_context_length: int) -> None:
        if prompt.token_ids is not None:
            return
        texts = [prompt.text or ""] if prompt.messages is None else [
            prompt.tools, *(text for m in prompt.messages for text in (m.content, m.tool_calls))]
        # surrogatepass: counting must not fail; the API layers refuse unencodable text with its parameter.
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
        limit = self.max_prompt_bytes or max_context_length * PROMPT_BYTES_PER_TOKEN
        if size > limit:
            metrics.REJECTED_INPUT.labels("prompt_too_large").inc()
            log.info("refused a %d-byte %s: over the %d-byte limit", size, prompt.param, limit)
            raise RequestTooLargeError(f"{prompt.param} ({size} bytes)", limit, prompt.param)

    def generate(self, request: PreparedRequest) -> AsyncIterator[SequenceEvent]:
        """Events of all n sequences, interleaved as they come. Closing the iterator cancels them all."""
        return traced_generation(request, self._generate(request))

    async def _generate(self, request: PreparedRequest) -> AsyncIterator[SequenceEvent]:
        n = request.params.n
        streams = [self._sequence(request, i, _sub_params(request.params, i),
                                  request.request_id if n == 1 else f"{request.request_id}-{i}") for i in range(n)]
        first_token_seen = False
        async with contextlib.aclosing(_merge(streams)) as events:
            async for event in events:
                if event.token_ids and not first_token_seen:
                    first_token_seen = True
                    metrics.TTFT.observe(asyncio.get_running_loop().time() - request.arrival)
                yield event
        metrics.E2E.observe(asyncio.get_running_loop().time() - request.arrival)

    def generate_batch(self, requests: list[PreparedRequest]) -> AsyncIterator[SequenceEvent]:
        """Events of a batch's prompts, interleaved as they come, each numbered as OpenAI numbers choices:
        prompt i's sequence j is index i * n + j. Closing the iterator cancels them all."""
        if len(requests) == 1:
            return self.generate(requests[0])
        return _merge([_renumbered(self.generate(request), i * request.params.n)
                       for i, request in enumerate(requests)])

    async def _sequence(self, request: PreparedRequest, index: int, params: SamplingParams,
                        request_id: str) -> AsyncIterator[SequenceEvent]:
        prompt = request.prompt_token_ids
        completion_tokens, cached_tokens, emitted = 0, 0, False
        last_batch_at: Optional[float] = None
        try:
            async with contextlib.aclosing(self.runner.tokens(request_id, prompt, params, request.deadline)) as batches:
                async for batch in batches:
                    if request.prompt_only:
                        batch = _without_output(batch)
                    if batch.cached_tokens is not None:
                        cached_tokens = batch.cached_tokens
                    completion_tokens += len(batch.token_ids)
                    last_batch_at = _record_tokens(last_batch_at, len(batch.token_ids))
                    finish = batch.finish_reason
                    text = batch.text if emitted or request.echo_text is None else request.echo_text + batch.text
                    event = SequenceEvent(index, text, batch.token_ids, batch.logprobs, finish,
                                          _stop_reason(batch, params) if finish == "stop" else None,
                                          prompt_logprobs=batch.prompt_logprobs)
                    if finish is not None:
                        event.usage = common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                                                       cached_tokens=cached_tokens)
                        if finish == "error":
                            event.error = UpstreamError(f"the engine failed the request: {batch.message}",
                                                        retryable=False)
                    emitted = True
                    yield event
                    if finish is not None:
                        return
            raise UpstreamError("the token stream ended without a finish reason", retryable=False)
        except (GatewayError, InvalidRequestError) as exc:
            if not emitted:
                raise
            log.warning("request %s: sequence %d failed after it started: %s", request_id, index, exc)
            usage = common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens,
                                     cached_tokens=cached_tokens)
            yield SequenceEvent(index, "", [], [], "error", usage=usage, error=exc)


async def _renumbered(events: AsyncIterator[SequenceEvent], offset: int) -> AsyncIterator[SequenceEvent]:
    async with contextlib.aclosing(events):
        async for event in events:
            event.index += offset
            yield event


def batch_usage(requests: list[PreparedRequest],
                usages: dict[int, Optional[common_pb2.Usage]]) -> common_pb2.Usage:
    """A batch's usage, from its sequences' (by choice index): each prompt's counted as total_usage counts one
    request's, then summed over the prompts."""
    totals = []
    for i, request in enumerate(requests):
        n = request.params.n
        totals.append(total_usage(len(request.prompt_token_ids), [usages.get(i * n + j) for j in range(n)]))
    return common_pb2.Usage(prompt_tokens=sum(u.prompt_tokens for u in totals),
                            completion_tokens=sum(u.completion_tokens for u in totals),
                            cached_tokens=sum(u.cached_tokens for u in totals))


def check_token_ids(token_ids: Sequence[int], info: ModelInfo, param: str) -> None:
    bad = [t for t in token_ids if not 0 <= t < info.vocab_size]
    if bad:
        raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {info.vocab_size})", param)


def _stop_reason(batch: TokenBatch, params: SamplingParams) -> Union[str, int, None]:
    """What ended a stopped sequence: the stop string or stop id the engine names, else a stop id the client
    listed that the engine took for EOS (it checks EOS first and names none): the client asked for that id."""
    if batch.stop_reason is not None:
        return batch.stop_reason
    last = batch.token_ids[-1] if batch.token_ids else None
    return last if last is not None and last in params.stop_token_ids else None


def _without_output(batch: TokenBatch) -> TokenBatch:
    """A prompt-only request's batch (max_tokens 0): nothing generated, and it ends for "length" unless it failed."""
    finish = batch.finish_reason if batch.finish_reason in (None, "error", "abort") else "length"
    return TokenBatch([], [], finish, batch.message, batch.cached_tokens, prompt_logprobs=batch.prompt_logprobs)


def _sub_params(params: SamplingParams, index: int) -> SamplingParams:
    """Each of the n sequences is its own n=1 request; a fixed seed still gives n different samples (wrapping
    within int64, the seed's wire type)."""
    seed = None if params.seed is None else (params.seed + index - SEED_MIN) % 2**64 + SEED_MIN
    return params.replace(n=1, seed=seed)


def _record_tokens(previous: Optional[float], num_tokens: int) -> Optional[float]:
    """Counts generated tokens and their inter-token latency; returns the time of the latest batch."""
    now = asyncio.get_running_loop().time()
    if previous is not None and num_tokens:
        for _ in range(num_tokens):
            metrics.INTER_TOKEN.observe((now - previous) / num_tokens)
    metrics.GENERATION_TOKENS.inc(num_tokens)
    return now if num_tokens else previous


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


async def _merge(streams: list[AsyncIterator[SequenceEvent]]) -> AsyncIterator[SequenceEvent]:
    """Interleaves several event streams; the first exception cancels the others and is raised."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for event in only:
                yield event
        return
    queue: asyncio.Queue[Union[SequenceEvent, _Failed, object]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[SequenceEvent]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for event in stream:
                    queue.put_nowait(event)
        except Exception as exc:
            queue.put_nowait(_Failed(exc))
        finally:
            queue.put_nowait(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
