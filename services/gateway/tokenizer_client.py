"""The gateway's side of the tokenizer service: prompts to ids, generated ids to text, and the model's limits."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import grpc

from splitserve.protos.splitserve.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from splitserve.services.gateway.errors import UpstreamError
from splitserve.services.gateway.rpc_errors import translate_rpc_error

# Tokenizers decide leading spaces and merges from the preceding ids; a few are enough for every tokenizer
# we know (vLLM uses 5).
DETOKENIZE_PREFIX_IDS = 6
_TOKEN_PIECE_CACHE_SIZE = 65536


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


class TokenizerClient:
    def __init__(self, channel: grpc.aio.Channel, timeout_s: float = 30.0):
        self._stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        self.timeout_s = timeout_s
        self._info: Optional[ModelInfo] = None
        self._token_pieces: OrderedDict[int, TokenPiece] = OrderedDict()

    async def info(self) -> ModelInfo:
        """Fetched once: a tokenizer serves one model for its whole life."""
        if self._info is None:
            try:
                reply = await self._stub.GetInfo(tokenizer_pb2.GetInfoRequest(), timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise translate_rpc_error("tokenizer", exc) from exc
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
        try:
            reply = await self._stub.Tokenize(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error("tokenizer", exc, default_param=param) from exc
        return list(reply.token_ids)

    async def token_pieces(self, token_ids: Sequence[int]) -> list[TokenPiece]:
        """Each id's own text (special tokens included) and real bytes, for logprob entries; cached, as
        alternatives repeat. One call for all the ids not cached."""
        missing = [t for t in dict.fromkeys(token_ids) if t not in self._token_pieces]
        if missing:
            try:
                reply = await self._stub.TokenPieces(tokenizer_pb2.TokenPiecesRequest(token_ids=missing),
                                                     timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise translate_rpc_error("tokenizer", exc) from exc
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
        return IncrementalDetokenizer(self._stub, list(prompt_token_ids[-DETOKENIZE_PREFIX_IDS:]),
                                      skip_special_tokens, timeout_s)


class IncrementalDetokenizer:
    """One DetokenizeStream per sequence: ids in, text deltas out, never a broken UTF-8 character.

    All groups of one push are written before their replies are read, so asking for one delta per token
    (needed to know which token completed a stop string) costs messages, not round trips.
    """

    def __init__(self, stub: tokenizer_pb2_grpc.TokenizerStub, prefix_token_ids: list[int],
                 skip_special_tokens: bool, timeout_s: float):
        self._stub = stub
        self._timeout_s = timeout_s
        self._prefix = prefix_token_ids
        self._skip = skip_special_tokens
        self._call = None

    async def push(self, groups: Sequence[Sequence[int]]) -> list[str]:
        """One text delta per group of ids, in order."""
        try:
            for group in groups:
                if self._call is None:
                    self._call = self._stub.DetokenizeStream(timeout=self._timeout_s)
                    request = tokenizer_pb2.DetokenizeStreamRequest(
                        token_ids=group, prefix_token_ids=self._prefix, skip_special_tokens=self._skip)
                else:
                    request = tokenizer_pb2.DetokenizeStreamRequest(token_ids=group)
                await self._call.write(request)
            return [(await self._read()).text_delta for _ in groups]
        except grpc.aio.AioRpcError as exc:
            raise translate_rpc_error("tokenizer", exc) from exc

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
