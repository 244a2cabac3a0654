"""Python client of the gateway's public gRPC API (`splitserve.v1.Gateway`): token ids and typed results,
no JSON. Light on purpose (grpcio and the generated messages only; no torch), so scripts and other services
can import it cheaply.

    async with Client("127.0.0.1:50070") as client:
        result = await client.generate("Hello", max_tokens=8, temperature=0)
        async for chunk in await client.generate("Hello", stream=True):
            print(chunk.text, end="")

`SyncClient` offers the same for scripts without an event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc

from splitserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from splitserve.serving.errors import param_from_error

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, str]]]

__all__ = ["Client", "SyncClient", "GatewayError", "Completion", "Chunk", "Usage", "TokenLogprob"]


class GatewayError(Exception):
    """The gateway refused or failed the request; status_code is the gRPC status (e.g. INVALID_ARGUMENT)."""

    def __init__(self, status_code: grpc.StatusCode, message: str, param: Optional[str] = None):
        super().__init__(f"{status_code.name}: {message}")
        self.status_code = status_code
        self.message = message
        self.param = param


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)    # (token id, logprob), most likely first


@dataclass
class Chunk:
    """New output of sequence `index`; the sequence's last chunk has finish_reason and usage."""
    text: str
    token_ids: list[int]
    index: int = 0
    finish_reason: Optional[str] = None       # "stop", "length", "abort" or "error"
    usage: Optional[Usage] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop: Union[str, int, None] = None        # the stop string or stop token id that ended the sequence
    message: str = ""                         # why, for "error" and "abort"
    request_id: str = ""


@dataclass
class Completion:
    """One whole sequence."""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop: Union[str, int, None] = None
    message: str = ""
    index: int = 0
    request_id: str = ""


def build_request(prompt: Prompt, *, model: Optional[str] = None, request_id: Optional[str] = None,
                  skip_special_tokens: bool = True, **sampling: Any) -> gateway_pb2.GatewayGenerateRequest:
    """A str is tokenized as is, a list of ints is token ids, a list of {"role", "content"} dicts is a chat.
    Sampling keywords left as None get the server's defaults."""
    request = gateway_pb2.GatewayGenerateRequest(model=model or "", request_id=request_id or "",
                                                 skip_special_tokens=skip_special_tokens)
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and all(isinstance(p, Mapping) for p in prompt):
        request.chat.messages.extend(common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
    elif all(isinstance(p, int) for p in prompt):
        request.token_ids.ids.extend(prompt)
    else:
        raise TypeError("prompt must be a str, a list of token ids or a list of chat messages")
    stop = sampling.pop("stop", None)
    if stop is not None:
        request.sampling_params.stop.extend([stop] if isinstance(stop, str) else stop)
    stop_token_ids = sampling.pop("stop_token_ids", None)
    if stop_token_ids:
        request.sampling_params.stop_token_ids.extend(stop_token_ids)
    for name, value in sampling.items():
        if value is not None:
            setattr(request.sampling_params, name, value)
    return request


def _finish_reason(value: int) -> Optional[str]:
    if value == common_pb2.FINISH_REASON_UNSPECIFIED:
        return None
    return common_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


def _chunk(msg: gateway_pb2.GatewayGenerateChunk) -> Chunk:
    usage = None
    if msg.HasField("usage"):
        usage = Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens)
    logprobs = [TokenLogprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
                for lp in msg.logprobs]
    return Chunk(text=msg.text_delta, token_ids=list(msg.token_ids), index=msg.index,
                 finish_reason=_finish_reason(msg.finish_reason), usage=usage, logprobs=logprobs,
                 stop=msg.stop or (msg.stop_token_id if msg.HasField("stop_token_id") else None),
                 message=msg.message, request_id=msg.request_id)


def _accumulate(chunks: Iterable[Chunk], n: int) -> list[Completion]:
    results = [Completion(index=i) for i in range(n)]
    for chunk in chunks:
        result = results[chunk.index]
        result.text += chunk.text
        result.token_ids += chunk.token_ids
        result.logprobs += chunk.logprobs
        result.request_id = chunk.request_id
        if chunk.finish_reason is not None:
            result.finish_reason, result.usage = chunk.finish_reason, chunk.usage
            result.stop, result.message = chunk.stop, chunk.message
    return results


def _error(exc: grpc.RpcError) -> GatewayError:
    return GatewayError(exc.code(), exc.details() or "", param_from_error(exc))


class Client:
    """Async client (grpc.aio). Use as `async with Client(address) as client:` or call close()."""

    def __init__(self, address: str, api_key: Optional[str] = None, timeout_s: Optional[float] = None):
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, prompt: Prompt, *, model: Optional[str] = None, max_tokens: Optional[int] = 16,
                       temperature: Optional[float] = 1.0, top_p: Optional[float] = None,
                       top_k: Optional[int] = None, min_p: Optional[float] = None, seed: Optional[int] = None,
                       stop: Union[str, Sequence[str], None] = None, stop_token_ids: Optional[Sequence[int]] = None,
                       ignore_eos: Optional[bool] = None, presence_penalty: Optional[float] = None,
                       frequency_penalty: Optional[float] = None, repetition_penalty: Optional[float] = None,
                       logprobs: Optional[int] = None, n: int = 1, min_tokens: Optional[int] = None,
                       skip_special_tokens: bool = True,
                       request_id: Optional[str] = None, stream: bool = False
                       ) -> Union[Completion, list[Completion], AsyncIterator[Chunk]]:
        """A Completion (a list of n when n > 1), or with stream=True an async iterator of Chunks.
        Raises GatewayError."""
        request = build_request(prompt, model=model, request_id=request_id, skip_special_tokens=skip_special_tokens,
                                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                                ignore_eos=ignore_eos, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                                logprobs=logprobs, n=n, min_tokens=min_tokens)
        if stream:
            return self._stream(request)
        chunks = [chunk async for chunk in self._stream(request)]
        results = _accumulate(chunks, n)
        return results[0] if n == 1 else results

    async def _stream(self, request: gateway_pb2.GatewayGenerateRequest) -> AsyncIterator[Chunk]:
        call = self._stub.Generate(request, metadata=self._metadata, timeout=self.timeout_s)
        try:
            async for msg in call:
                yield _chunk(msg)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()   # a consumer that stops early aborts the request and frees its KV


class SyncClient:
    """Blocking client for scripts; same arguments and results as Client.generate."""

    def __init__(self, address: str, api_key: Optional[str] = None, timeout_s: Optional[float] = None):
        self._channel = grpc.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    def __enter__(self) -> "SyncClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: Prompt, *, model: Optional[str] = None, stream: bool = False,
                 request_id: Optional[str] = None, skip_special_tokens: bool = True, n: int = 1,
                 max_tokens: Optional[int] = 16, temperature: Optional[float] = 1.0, **sampling: Any
                 ) -> Union[Completion, list[Completion], Iterator[Chunk]]:
        request = build_request(prompt, model=model, request_id=request_id, skip_special_tokens=skip_special_tokens,
                                n=n, max_tokens=max_tokens, temperature=temperature, **sampling)
        if stream:
            return self._stream(request)
        results = _accumulate(list(self._stream(request)), n)
        return results[0] if n == 1 else results

    def _stream(self, request: gateway_pb2.GatewayGenerateRequest) -> Iterator[Chunk]:
        call = self._stub.Generate(request, metadata=self._metadata, timeout=self.timeout_s)
        try:
            for msg in call:
                yield _chunk(msg)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()
