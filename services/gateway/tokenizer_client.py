"""The gateway's side of the tokenizer service: prompts to ids, generated ids to text, and the model's limits.

The tokenizer may run as several replicas (all stateless and alike). Each call goes to the next healthy one in
turn; a call that finds its replica down (WORKER_DOWN_CODES) marks it unhealthy and is tried once more on
another, so a replica's crash costs no request while another is up. Counted in
splitserve_gateway_tokenizer_retries_total and logged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc

from splitserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import UpstreamError
from splitserve.services.gateway.rpc_errors import WORKER_DOWN_CODES, translate_rpc_error
from splitserve.services.gateway.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

# Tokenizers decide leading spaces and merges from the preceding ids; a few are enough for every tokenizer
# we know (vLLM uses 5).
DETOKENIZE_PREFIX_IDS = 6
_TOKEN_PIECE_CACHE_SIZE = 65536
TRIES = 2  # a call and one retry on another replica: a crash is survived, a broken request is not multiplied


@dataclass(frozen=True)
class TokenPiece:
    text: str        # what the token shows on its own (U+FFFD for part of a character)
    data: bytes      # the bytes it stands for: joined over tokens they rebuild the text's UTF-8


@dataclass(frozen=True)
class ModelInfo:
    model: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context_length: int
    has_chat_template: bool


class TokenizerReplicas:
    """Which replica a call goes to, and what a failed call means for that replica."""

    def __init__(self, pool: WorkerPool):
        self._pool = pool
        self._turns: dict[str, int] = {}

    def candidates(self, method: str) -> list[Worker]:
        """Up to TRIES replicas, healthy ones first, each method's calls in turn (one turn for all would send a
        request's Tokenize and its DetokenizeStream always to the same two replicas); unhealthy ones last, since a
        replica the pool has not yet seen come back may already answer (better a try than a refusal)."""
        replicas = self._pool.workers("tokenizer")
        turn = self._turns[method] = (self._turns.get(method, -1) + 1) % len(replicas)
        ordered = replicas[turn:] + replicas[:turn]
        return sorted(ordered, key=lambda w: not w.healthy)[:TRIES]

    def failed(self, worker: Worker, method: str, exc: grpc.aio.AioRpcError, another_left: bool) -> bool:
        """Accounts for a failed call; True when it should be retried on the next candidate: only when the
        replica was down, since a refusal or a missed deadline would be the same anywhere."""
        code = exc.code()
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED):
            return False  # the request's input or its deadline, not the replica
        metrics.WORKER_FAILURES.labels("tokenizer", code.name).inc()
        if code not in WORKER_DOWN_CODES:
            return False
        self._pool.mark_failed(worker, f"{method} failed: {code.name}")
        if another_left:
            metrics.TOKENIZER_RETRIES.labels(method).inc()
            log.warning("tokenizer %s: %s failed (%s: %s); retrying on another replica", worker.address, method,
                        code.name, exc.details())
        return another_left

    async def call(self, method: str, request, timeout_s: float, default_param: Optional[str] = None):
        """The unary `method` on one replica, or on a second one if the first was down."""
        candidates = self.candidates(method)
        for attempt, worker in enumerate(candidates):
            stub = tokenizer_pb2_grpc.TokenizerStub(worker.channel)
            try:
                return await getattr(stub, method)(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                if not self.failed(worker, method, exc, another_left=attempt + 1 < len(candidates)):
                    raise translate_rpc_error("tokenizer", exc, default_param=default_param) from exc
        raise AssertionError("unreachable: the pool always holds a tokenizer")


class TokenizerClient:
    def __init__(self, pool: WorkerPool, timeout_s: float = 30.0):
        self._replicas = TokenizerReplicas(pool)
        self.timeout_s = timeout_s
        self._info: Optional[ModelInfo] = None
        self._token_pieces: OrderedDict[int, TokenPiece] = OrderedDict()

    async def info(self) -> ModelInfo:
        """Fetched once: the tokenizer serves one model for its whole life."""
        if self._info is None:
            reply = await self._replicas.call("GetInfo", tokenizer_pb2.GetInfoRequest(), self.timeout_s)
            self._info = ModelInfo(model=reply.model, vocab_size=reply.vocab_size,
                                   eos_token_ids=tuple(reply.eos_token_ids),
                                   max_context_length=reply.max_context_length,
                                   has_chat_template=reply.has_chat_template)
        return self._info

    async def tokenize_text(self, text: str) -> list[int]:
        return await self._tokenize(tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=True), "prompt")

    async def tokenize_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages])
        return await self._tokenize(tokenizer_pb2.TokenizeRequest(chat=chat, add_generation_prompt=True),
                                    "messages")

    async def _tokenize(self, request: tokenizer_pb2.TokenizeRequest, param: str) -> list[int]:
        reply = await self._replicas.call("Tokenize", request, self.timeout_s, default_param=param)
        return list(reply.token_ids)

    async def token_pieces(self, token_ids: Sequence[int]) -> list[TokenPiece]:
        """Each id's own text (special tokens included) and real bytes, for logprob entries; cached, as
        alternatives repeat. One call for all the ids not cached."""
        missing = [t for t in dict.fromkeys(token_ids) if t not in self._token_pieces]
        if missing:
            reply = await self._replicas.call("TokenPieces", tokenizer_pb2.TokenPiecesRequest(token_ids=missing),
                                              self.timeout_s)
            if len(reply.pieces) != len(missing):
                raise UpstreamError(f"tokenizer answered {len(reply.pieces)} token pieces for {len(missing)} ids",
                                    retryable=False)
            for token_id, piece in zip(missing, reply.pieces):
                self._token_pieces[token_id] = TokenPiece(piece.text, piece.token_bytes)
        pieces = [self._token_pieces[t] for t in token_ids]
        while len(self._token_pieces) > _TOKEN_PIECE_CACHE_SIZE:
            self._token_pieces.popitem(last=False)
        return pieces

    def detokenizer(self, prompt_token_ids: Sequence[int], skip_special_tokens: bool,
                    timeout_s: float) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self._replicas, list(prompt_token_ids[-DETOKENIZE_PREFIX_IDS:]),
                                      skip_special_tokens, timeout_s)


class IncrementalDetokenizer:
    """One DetokenizeStream per sequence: ids in, text deltas out, never a broken UTF-8 character.

    All groups of one push are written before their replies are read, so asking for one delta per token
    (needed to know which token completed a stop string) costs messages, not round trips.

    The stream's state (held-back bytes) lives on one replica, so only a stream that has not answered yet moves
    to another replica when its own is down; later failures end the request.
    """

    def __init__(self, replicas: TokenizerReplicas, prefix_token_ids: list[int], skip_special_tokens: bool,
                 timeout_s: float):
        self._replicas = replicas
        self._timeout_s = timeout_s
        self._prefix = prefix_token_ids
        self._skip = skip_special_tokens
        self._call = None
        self._worker: Optional[Worker] = None

    async def push(self, groups: Sequence[Sequence[int]]) -> list[str]:
        """One text delta per group of ids, in order."""
        if not groups:
            return []
        if self._call is not None:
            try:
                return await self._exchange(groups)
            except grpc.aio.AioRpcError as exc:
                self._replicas.failed(self._worker, "DetokenizeStream", exc, another_left=False)
                raise translate_rpc_error("tokenizer", exc) from exc
        candidates = self._replicas.candidates("DetokenizeStream")
        for attempt, worker in enumerate(candidates):
            self._worker = worker
            self._call = tokenizer_pb2_grpc.TokenizerStub(worker.channel).DetokenizeStream(timeout=self._timeout_s)
            try:
                return await self._exchange(groups, first=True)
            except grpc.aio.AioRpcError as exc:
                self.cancel()
                another_left = attempt + 1 < len(candidates)
                if not self._replicas.failed(worker, "DetokenizeStream", exc, another_left):
                    raise translate_rpc_error("tokenizer", exc) from exc
        raise AssertionError("unreachable: the pool always holds a tokenizer")

    async def _exchange(self, groups: Sequence[Sequence[int]], first: bool = False) -> list[str]:
        for index, group in enumerate(groups):
            if first and index == 0:
                request = tokenizer_pb2.DetokenizeStreamRequest(
                    token_ids=group, prefix_token_ids=self._prefix, skip_special_tokens=self._skip)
            else:
                request = tokenizer_pb2.DetokenizeStreamRequest(token_ids=group)
            await self._call.write(request)
        return [(await self._read()).text_delta for _ in groups]

    async def finish(self) -> str:
        """Half-closes the stream and returns the flushed text (held-back bytes as U+FFFD)."""
        if self._call is None:
            return ""
        try:
            await self._call.done_writing()
            text = ""
            while True:
                reply = await self._read()
                text += reply.text_delta
                if reply.final:
                    return text
        except grpc.aio.AioRpcError as exc:
            self._replicas.failed(self._worker, "DetokenizeStream", exc, another_left=False)
            raise translate_rpc_error("tokenizer", exc) from exc
        finally:
            self._call = None

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def _read(self) -> tokenizer_pb2.DetokenizeStreamResponse:
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise UpstreamError("tokenizer failed: DetokenizeStream ended before answering every message",
                                retryable=False)
        return reply
