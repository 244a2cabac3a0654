"""Deterministic stand-ins for the tokenizer, prefill and decode services, speaking their real protos.

The "model": each next token is the previous one plus a step (1, or 1 + seed % 2 with a seed), modulo the
vocabulary; token 0 is EOS. The "tokenizer": a number in the prompt is that token id, any other word maps to
a fixed id; ids ending in 7 and 8 are the two UTF-8 bytes of "é", so a sequence passing 7 → 8 tests that no
delta splits a character. Every other id's text is " w<id>".

The workers make the text, as the real ones do: with the engine's own OutputText over the fake tokenizer, so
stop strings end sequences in the worker and the text they send is already cut.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.engine.output_text import OutputText
from splitserve.proto_convert import sampling_params_from_proto, stop_reason_to_proto
from splitserve.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc,
                                             tokenizer_pb2, tokenizer_pb2_grpc)
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.engine_worker import WorkerIdentity
from splitserve.serving.errors import abort_invalid

VOCAB = 1000
EOS, IM_START, IM_END = 0, 1, 2
SPECIAL = {EOS: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
FORBIDDEN_STOP_TOKEN = 999      # prefill refuses it, to test INVALID_ARGUMENT passing through with its param


def token_bytes(token_id: int) -> bytes:
    if token_id in SPECIAL:
        return SPECIAL[token_id].encode()
    if token_id % 10 == 7:
        return b"\xc3"
    if token_id % 10 == 8:
        return b"\xa9"
    return f" w{token_id}".encode()


def decode_text(token_ids: list[int], skip_special: bool = True) -> str:
    data = b"".join(token_bytes(t) for t in token_ids if not (skip_special and t in SPECIAL))
    return data.decode("utf-8", errors="replace")


class _DecodeOnly:
    """What OutputText needs of a tokenizer."""

    @staticmethod
    def decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return decode_text(list(token_ids), skip_special_tokens)


def output_text(request) -> OutputText:
    """The sequence's text state, replayed over the tokens produced before this call (first token, failover)."""
    params = sampling_params_from_proto(request.sampling_params)
    text = OutputText(_DecodeOnly(), list(request.prompt_token_ids), params)
    text.replay(getattr(request, "produced_token_ids", []))
    return text


def word_id(word: str) -> int:
    if word.isascii() and word.isdigit():   # not "²", which isdigit() but int() refuses
        return int(word) % VOCAB
    return 3 + zlib.crc32(word.encode()) % 900


def tokenize(text: str) -> list[int]:
    return [word_id(w) for w in text.split()]


def tokenize_chat(messages: list[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
    ids = []
    for role, content in messages:
        ids += [IM_START, *tokenize(role), *tokenize(content), IM_END]
    return ids + [IM_START, word_id("assistant")] if add_generation_prompt else ids


def next_token(previous: int, seed: Optional[int]) -> int:
    step = 1 if seed is None else 1 + seed % 2
    return (previous + step) % VOCAB


def expected_tokens(prompt: list[int], max_tokens: int, seed: Optional[int] = None) -> list[int]:
    """What the fake model generates (EOS ends it), prefilled remotely or not."""
    out, previous = [], prompt[-1]
    while len(out) < max_tokens:
        previous = next_token(previous, seed)
        out.append(previous)
        if previous == EOS:
            break
    return out


def fake_logprob(token_id: int, top: int) -> common_pb2.TokenLogprob:
    """As the engine sends them: each token with its own text and bytes."""
    alternatives = [(token_id, -0.5), ((token_id + 500) % VOCAB, -1.5), ((token_id + 501) % VOCAB, -2.5)]
    return common_pb2.TokenLogprob(
        token_id=token_id, logprob=-0.5, token=decode_text([token_id], False), token_bytes=token_bytes(token_id),
        top=[common_pb2.TokenLogprob(token_id=t, logprob=lp, token=decode_text([t], False),
                                     token_bytes=token_bytes(t)) for t, lp in alternatives[:top]])


def _seed(params: common_pb2.SamplingParams) -> Optional[int]:
    return params.seed if params.HasField("seed") else None


def _max_tokens(params: common_pb2.SamplingParams) -> int:
    return params.max_tokens if params.HasField("max_tokens") else 16


class FakeTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, max_context_length: int = 256, model: str = "fake-model"):
        self.max_context_length = max_context_length
        self.model = model
        # Calls per method, so tests can check what the gateway asks the tokenizer (nothing per token).
        self.calls: dict[str, int] = {}
        self.chat_requests: list[tokenizer_pb2.TokenizeRequest] = []

    def _count(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1

    async def Tokenize(self, request, context):
        self._count("Tokenize")
        if request.WhichOneof("input") == "chat":
            self.chat_requests.append(request)
            ids = tokenize_chat([(m.role, m.content) for m in request.chat.messages], request.add_generation_prompt)
            return tokenizer_pb2.TokenizeResponse(token_ids=ids, rendered_prompt="(chat)")
        if "INVALID" in request.text:
            await abort_invalid(context, InvalidRequestError("the tokenizer refuses this text", "prompt"))
        return tokenizer_pb2.TokenizeResponse(token_ids=tokenize(request.text))

    async def Detokenize(self, request, context):
        self._count("Detokenize")
        return tokenizer_pb2.DetokenizeResponse(text=decode_text(list(request.token_ids),
                                                                 request.skip_special_tokens))

    async def TokenPieces(self, request, context):
        self._count("TokenPieces")
        return tokenizer_pb2.TokenPiecesResponse(pieces=[
            tokenizer_pb2.TokenPiece(text=decode_text([t], skip_special=False), token_bytes=token_bytes(t))
            for t in request.token_ids])

    async def GetInfo(self, request, context):
        self._count("GetInfo")
        return tokenizer_pb2.GetInfoResponse(model=self.model, vocab_size=VOCAB, eos_token_ids=[EOS],
                                             max_context_length=self.max_context_length, has_chat_template=True)


@dataclass
class FakeWorker:
    """What prefill and decode fakes share: the requests they were sent, and the Stats reply (with a membership
    proof when given a token) in the role's own response type."""
    KIND: ClassVar[str]
    STATS_RESPONSE: ClassVar[type]
    model: str = "fake-model"
    cluster_token: Optional[str] = None
    address: str = ""                              # set by FakeServer.start, as a real worker knows its own
    health_address: str = ""                       # a real worker's health thread
    stats_calls: int = 0
    requests: list = field(default_factory=list)

    def identity(self) -> WorkerIdentity:
        return WorkerIdentity(self.KIND, self.address, self.model, self.cluster_token, self.health_address)

    async def Stats(self, request, context):
        self.stats_calls += 1
        return self.STATS_RESPONSE(engine=common_pb2.EngineStats(model=self.model),
                                   membership=self.identity().answer(request.nonce))


@dataclass
class FakePrefill(FakeWorker, prefill_pb2_grpc.PrefillServicer):
    KIND = "prefill"
    STATS_RESPONSE = common_pb2.WorkerStatsResponse
    cached_tokens: int = 3
    handoff_delay_s: float = 0.0                   # between the first token and the KV handle
    handoff_error: Optional[grpc.StatusCode] = None  # fail the call after the first token, instead of the handle

    async def Prefill(self, request, context):
        self.requests.append(request)
        params = request.sampling_params
        if FORBIDDEN_STOP_TOKEN in params.stop_token_ids:
            await abort_invalid(context, InvalidRequestError(f"stop token {FORBIDDEN_STOP_TOKEN} is not allowed",
                                                             "stop_token_ids"))
        first = next_token(request.prompt_token_ids[-1], _seed(params))
        text = output_text(request)
        first_text = text.push(first)
        finish, stop_reason = common_pb2.FINISH_REASON_UNSPECIFIED, None
        if first == EOS and not params.ignore_eos:
            finish = common_pb2.FINISH_REASON_STOP
        elif first in params.stop_token_ids and params.min_tokens < 1:
            finish, stop_reason = common_pb2.FINISH_REASON_STOP, first
        elif text.stop_string is not None:
            finish, stop_reason = common_pb2.FINISH_REASON_STOP, text.stop_string
        elif _max_tokens(params) == 1:
            finish = common_pb2.FINISH_REASON_LENGTH
            first_text += text.finish()
        reply = prefill_pb2.PrefillResponse(first_text=first_text,
            request_id=request.request_id, first_token_id=first, cached_tokens=self.cached_tokens,
            finish_reason=finish)
        if stop_reason is not None:
            reply.stop_reason.CopyFrom(stop_reason_to_proto(stop_reason))
        if params.HasField("logprobs"):
            reply.first_token_logprob.CopyFrom(fake_logprob(first, params.logprobs))
        yield reply                                 # the first token, then (decode to go on) the KV handle
        if finish == common_pb2.FINISH_REASON_UNSPECIFIED:
            await asyncio.sleep(self.handoff_delay_s)
            if self.handoff_error is not None:
                await context.abort(self.handoff_error, "the prefill worker failed storing the blocks")
            yield prefill_pb2.PrefillResponse(request_id=request.request_id, kv_handle=common_pb2.KVHandle(
                store_address=request.kv_target.store_address))


@dataclass
class FakeDecode(FakeWorker, decode_pb2_grpc.DecodeServicer):
    KIND = "decode"
    STATS_RESPONSE = common_pb2.WorkerStatsResponse
    token_delay_s: float = 0.0
    chunk_tokens: int = 1
    cached_tokens: int = 0
    fail_with: Optional[grpc.StatusCode] = None    # abort every Generate before any token with this code
    die_after_tokens: Optional[int] = None         # stop the whole server after this many tokens of its own
    engine_error: Optional[str] = None             # end every stream with an ERROR chunk carrying this message
    server: Optional[grpc.aio.Server] = None
    cancelled: list = field(default_factory=list)  # request ids whose stream the caller cancelled
    finished: list = field(default_factory=list)   # request ids whose stream ran to its end
    active: int = 0
    running: set = field(default_factory=set)

    async def Generate(self, request, context):
        self.requests.append(request)
        if request.request_id in self.running:    # as the engine does
            await abort_invalid(context, InvalidRequestError(f"request id {request.request_id!r} is already running",
                                                             "request_id"))
        self.running.add(request.request_id)
        self.active += 1
        try:
            if self.fail_with is not None:
                await context.abort(self.fail_with, "injected failure")
            if self.engine_error is not None:
                yield decode_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_ERROR,
                                               message=self.engine_error)
                return
            params = request.sampling_params
            seed, max_tokens = _seed(params), _max_tokens(params)
            given = list(request.produced_token_ids)  # the prefill's first token, or a failed worker's tokens
            previous, produced = (given[-1], len(given)) if given else (request.prompt_token_ids[-1], 0)
            text = output_text(request)
            pending, logprobs, finish, stop_reason = [], [], common_pb2.FINISH_REASON_UNSPECIFIED, None
            delta = ""
            while finish == common_pb2.FINISH_REASON_UNSPECIFIED:
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                previous = next_token(previous, seed)
                produced += 1
                pending.append(previous)
                delta += text.push(previous)
                if params.HasField("logprobs"):
                    logprobs.append(fake_logprob(previous, params.logprobs))
                can_stop = produced > params.min_tokens
                if previous == EOS and not params.ignore_eos:
                    finish = common_pb2.FINISH_REASON_STOP
                elif previous in params.stop_token_ids and can_stop:
                    finish, stop_reason = common_pb2.FINISH_REASON_STOP, previous
                elif text.stop_string is not None:
                    finish, stop_reason = common_pb2.FINISH_REASON_STOP, text.stop_string
                elif produced >= max_tokens:
                    finish = common_pb2.FINISH_REASON_LENGTH
                if finish != common_pb2.FINISH_REASON_UNSPECIFIED:
                    delta += text.finish()
                if self.die_after_tokens is not None and produced - len(given) > self.die_after_tokens:
                    asyncio.get_running_loop().create_task(self.server.stop(None))
                    await asyncio.sleep(30)
                if len(pending) >= self.chunk_tokens or finish != common_pb2.FINISH_REASON_UNSPECIFIED:
                    chunk = decode_pb2.GenerateChunk(token_ids=pending, logprobs=logprobs, finish_reason=finish,
                                                     text=delta)
                    if stop_reason is not None:
                        chunk.stop_reason.CopyFrom(stop_reason_to_proto(stop_reason))
                    if finish != common_pb2.FINISH_REASON_UNSPECIFIED:
                        chunk.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                              completion_tokens=produced,
                                                              cached_tokens=self.cached_tokens))
                    yield chunk
                    pending, logprobs, delta = [], [], ""
            self.finished.append(request.request_id)
        except (asyncio.CancelledError, GeneratorExit):
            # gRPC ends a cancelled streaming handler either by cancelling its task (while it awaits) or by
            # closing the generator (while it is suspended at a yield).
            self.cancelled.append(request.request_id)
            raise
        finally:
            self.active -= 1
            self.running.discard(request.request_id)


class FakeServer:
    """One fake service on a free port, with grpc.health.v1 SERVING."""

    def __init__(self, servicer, add_fn):
        self.servicer = servicer
        self._add_fn = add_fn
        self.server: Optional[grpc.aio.Server] = None
        self.address = ""

    async def start(self) -> "FakeServer":
        self.server = grpc.aio.server()
        self._add_fn(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if hasattr(self.servicer, "server"):
            self.servicer.server = self.server
        self.address = f"127.0.0.1:{port}"
        if hasattr(self.servicer, "address"):
            self.servicer.address = self.address
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(None)


def tokenizer_server(**kwargs) -> FakeServer:
    return FakeServer(FakeTokenizer(**kwargs), tokenizer_pb2_grpc.add_TokenizerServicer_to_server)


def prefill_server(**kwargs) -> FakeServer:
    return FakeServer(FakePrefill(**kwargs), prefill_pb2_grpc.add_PrefillServicer_to_server)


def decode_server(**kwargs) -> FakeServer:
    return FakeServer(FakeDecode(**kwargs), decode_pb2_grpc.add_DecodeServicer_to_server)
