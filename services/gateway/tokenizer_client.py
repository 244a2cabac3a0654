"""The gateway's side of the tokenizer service: prompts to ids and the model's limits. Generated text comes
from the workers, with the tokens: nothing here is called per token.

The tokenizer may run as several replicas (all stateless and alike). Each call goes to the next healthy one in
turn; a call that finds its replica down (WORKER_DOWN_CODES) marks it unhealthy and is tried once more on
another, so a replica's crash costs no request while another is up. Counted in
splitserve_gateway_tokenizer_retries_total and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc

from splitserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from splitserve.services.gateway import metrics, overhead
from splitserve.services.gateway.rpc_errors import WORKER_DOWN_CODES, translate_rpc_error
from splitserve.services.gateway.workers import Worker, WorkerPool

log = logging.getLogger(__name__)

TRIES = 2  # a call and one retry on another replica: a crash is survived, a broken request is not multiplied


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
        request's Tokenize and its GetInfo always to the same two replicas); unhealthy ones last, since a
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
                with overhead.waiting():
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

    async def info(self) -> ModelInfo:
        """Fetched once: the tokenizer serves one model for its whole life."""
        if self._info is None:
            reply = await self._replicas.call("GetInfo", tokenizer_pb2.GetInfoRequest(), self.timeout_s)
            self._info = ModelInfo(model=reply.model, vocab_size=reply.vocab_size,
                                   eos_token_ids=tuple(reply.eos_token_ids),
                                   max_context_length=reply.max_context_length,
                                   has_chat_template=reply.has_chat_template)
        return self._info

    async def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._tokenize(tokenizer_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens),
                                    "prompt")

    async def tokenize_chat(self, messages: Sequence[common_pb2.ChatMessage], add_generation_prompt: bool = True,
                            tools: str = "") -> list[int]:
        chat = common_pb2.ChatMessages(messages=messages)
        return await self._tokenize(tokenizer_pb2.TokenizeRequest(chat=chat, tools=tools,
                                                                  add_generation_prompt=add_generation_prompt),
                                    "messages")

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        request = tokenizer_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self._replicas.call("Detokenize", request, self.timeout_s, default_param="tokens")).text

    async def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's text on its own (the /tokenize API's token_strs)."""
        request = tokenizer_pb2.TokenPiecesRequest(token_ids=token_ids)
        reply = await self._replicas.call("TokenPieces", request, self.timeout_s, default_param="tokens")
        return [piece.text for piece in reply.pieces]

    async def _tokenize(self, request: tokenizer_pb2.TokenizeRequest, param: str) -> list[int]:
        reply = await self._replicas.call("Tokenize", request, self.timeout_s, default_param=param)
        return list(reply.token_ids)
