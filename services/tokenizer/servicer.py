"""The splitserve.v1.Tokenizer gRPC methods: wire messages in and out, typed errors turned into statuses.

Tokenizer calls are CPU work on the event loop. Chat-sized inputs take well under a millisecond, so they run
inline; big ones (a long document, a whole generation to detokenize) go to a thread so that the other calls on
this loop are not stalled behind them. Generated text is not made here: the engines detokenize what they generate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Callable, TypeVar

import grpc

from splitserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.errors import abort_invalid
from splitserve.services.tokenizer import metrics
from splitserve.services.tokenizer.chat_messages import chat_message, chat_tools
from splitserve.services.tokenizer.tokenizer_model import ChatTemplateMissingError, TokenizerModel

log = logging.getLogger(__name__)

T = TypeVar("T")

# Above these sizes a call leaves the event loop (~10k characters is a few milliseconds of tokenization).
LARGE_TEXT_CHARS = 10_000
LARGE_TOKEN_COUNT = 2_500


async def _run(large: bool, fn: Callable[..., T], *args) -> T:
    return await asyncio.to_thread(fn, *args) if large else fn(*args)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, model: TokenizerModel):
        self.model = model
        self._active_calls = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def Tokenize(self, request: tokenizer_pb2.TokenizeRequest, context) -> tokenizer_pb2.TokenizeResponse:
        async with self._call("Tokenize", context):
            if request.WhichOneof("input") == "chat":
                messages = [chat_message(m) for m in request.chat.messages]
                tools = chat_tools(request.tools)
                large = sum(len(m.content) + len(m.tool_calls) for m in request.chat.messages) > LARGE_TEXT_CHARS
                ids, rendered = await _run(large, self.model.encode_chat, messages, request.add_generation_prompt,
                                           tools)
                return tokenizer_pb2.TokenizeResponse(token_ids=ids, rendered_prompt=rendered)
            large = len(request.text) > LARGE_TEXT_CHARS
            ids = await _run(large, self.model.encode_text, request.text, request.add_special_tokens)
            return tokenizer_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: tokenizer_pb2.DetokenizeRequest,
                         context) -> tokenizer_pb2.DetokenizeResponse:
        async with self._call("Detokenize", context):
            large = len(request.token_ids) > LARGE_TOKEN_COUNT
            text = await _run(large, self.model.decode, list(request.token_ids), request.skip_special_tokens)
            return tokenizer_pb2.DetokenizeResponse(text=text)

    async def TokenPieces(self, request: tokenizer_pb2.TokenPiecesRequest,
                          context) -> tokenizer_pb2.TokenPiecesResponse:
        async with self._call("TokenPieces", context):
            pieces = await _run(len(request.token_ids) > LARGE_TOKEN_COUNT, self.model.token_pieces,
                                list(request.token_ids))
            return tokenizer_pb2.TokenPiecesResponse(
                pieces=[tokenizer_pb2.TokenPiece(text=text, token_bytes=data) for text, data in pieces])

    async def GetInfo(self, request: tokenizer_pb2.GetInfoRequest, context) -> tokenizer_pb2.GetInfoResponse:
        async with self._call("GetInfo", context):
            info = self.model.info
            response = tokenizer_pb2.GetInfoResponse(
                model=info.model, vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids,
                max_context_length=info.max_context_length, has_chat_template=info.has_chat_template)
            if info.bos_token_id is not None:
                response.bos_token_id = info.bos_token_id
            return response

    async def wait_idle(self) -> None:
        """Returns once no call is in flight: the drain step of a graceful stop."""
        await self._idle.wait()

    @contextlib.asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext):
        """Counts the call, times it, and turns the logic's typed errors into gRPC statuses."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        self._active_calls += 1
        self._idle.clear()
        try:
            yield
        except InvalidRequestError as exc:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await abort_invalid(context, exc)
        except ChatTemplateMissingError as exc:
            code = grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, str(exc))
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            await context.abort(code, f"{method} failed inside the tokenizer service; see its log")
        finally:
            metrics.record(method, code.name, time.perf_counter() - start)
            self._active_calls -= 1
            if self._active_calls == 0:
                self._idle.set()
