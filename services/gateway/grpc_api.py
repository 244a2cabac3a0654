"""The public gRPC API (splitserve.v1.Gateway): the same pipeline as the REST API, errors as gRPC statuses.

Bad input is INVALID_ARGUMENT with a message, including a request protobuf cannot parse (a string that is not
UTF-8); a full admission queue is RESOURCE_EXHAUSTED; messages over max_body_bytes are refused by gRPC itself
(RESOURCE_EXHAUSTED) before they are read.
"""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator, Optional

import grpc
from google.protobuf.message import DecodeError

from splitserve.proto_convert import finish_reason_to_proto, sampling_params_from_proto
from splitserve.v1 import gateway_pb2, gateway_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.errors import abort_invalid
from splitserve.services.gateway import metrics, overhead
from splitserve.services.gateway.admission import Admission, Ticket
from splitserve.services.gateway.auth import check_api_key
from splitserve.services.gateway.errors import (AuthenticationError, DrainingError, ModelNotFoundError,
                                                NoHealthyWorkerError, OverloadedError, RequestTimeoutError,
                                                ShutdownError, UpstreamError)
from splitserve.services.gateway.outputs import SequenceEvent
from splitserve.services.gateway.pipeline import GenerationRequest, Pipeline, Prompt, internal_request_id
from splitserve.services.gateway.race import unless_set

log = logging.getLogger(__name__)

ENDPOINT = "grpc_generate"
SERVICE_NAME = "splitserve.v1.Gateway"
# gRPC clients with a retry policy wait this long before retrying an overloaded call (gRFC A6 pushback).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


def status_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, InvalidRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, OverloadedError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (NoHealthyWorkerError, DrainingError, ShutdownError)):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, RequestTimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, UpstreamError) and exc.retryable:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: Pipeline, admission: Admission, api_key: Optional[str]):
        self.pipeline = pipeline
        self.admission = admission
        self.api_key = api_key

    async def Generate(self, request: gateway_pb2.GatewayGenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GatewayGenerateChunk]:
        timer = overhead.start_request()
        ticket: Optional[Ticket] = None
        code = grpc.StatusCode.CANCELLED   # until the stream reaches its end
        try:
            metadata = {key: value for key, value in (context.invocation_metadata() or ())}
            check_api_key(metadata.get("authorization"), self.api_key)
            generation = generation_request(request)
            ticket = await self.admission.admit()
            # Each step races the drain's abort rather than being cancelled by it: a cancel landing while gRPC
            # writes a chunk is taken by gRPC's own write, and the call then ran on without ending.
            prepared = await unless_set(self.pipeline.prepare(generation), ticket.aborted)
            # The client's own id comes back as sent; the workers see a unique one (internal_request_id).
            reply_id = request.request_id or prepared.request_id
            async with contextlib.aclosing(self.pipeline.generate(prepared)) as events:
                while True:
                    try:
                        event = await unless_set(anext(events), ticket.aborted)
                    except StopAsyncIteration:
                        break
                    yield chunk_from_event(event, reply_id)
            code = grpc.StatusCode.OK
            timer.finish()
        except Exception as exc:
            code = status_of(exc)
            if code == grpc.StatusCode.INTERNAL and not isinstance(exc, UpstreamError):
                log.error("internal error in Gateway.Generate", exc_info=exc)
            if isinstance(exc, InvalidRequestError):
                await abort_invalid(context, exc)
            if isinstance(exc, OverloadedError):
                context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, str(exc.retry_after_s * 1000)),))
            message = str(exc) if code != grpc.StatusCode.INTERNAL or isinstance(exc, UpstreamError) \
                else "internal error; see the gateway's log"
            await context.abort(code, message)
        finally:
            metrics.REQUESTS.labels(ENDPOINT, code.name).inc()
            if ticket is not None:
                ticket.release()


class UndecodableRequest:
    """Request bytes protobuf could not parse; Generate answers them with INVALID_ARGUMENT."""

    def __init__(self, error: DecodeError):
        self.error = error


def _decode_request(data: bytes) -> "gateway_pb2.GatewayGenerateRequest | UndecodableRequest":
    try:
        return gateway_pb2.GatewayGenerateRequest.FromString(data)
    except DecodeError as exc:
        return UndecodableRequest(exc)


def add_to_server(servicer: GatewayServicer, server: grpc.aio.Server) -> None:
    """The generated add_GatewayServicer_to_server, except for the request decoder: with the generated one a
    request protobuf refuses (a lone surrogate sent as UTF-8 bytes) fails inside gRPC as an INTERNAL error."""
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=_decode_request,
        response_serializer=gateway_pb2.GatewayGenerateChunk.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def generation_request(request: "gateway_pb2.GatewayGenerateRequest | UndecodableRequest") -> GenerationRequest:
    if isinstance(request, UndecodableRequest):
        metrics.REJECTED_INPUT.labels("invalid_unicode").inc()
        raise InvalidRequestError(f"the request is not a valid GatewayGenerateRequest (strings must be UTF-8): "
                                  f"{request.error}")
    which = request.WhichOneof("prompt")
    if which == "text":
        prompt = Prompt(text=request.text)
    elif which == "token_ids":
        prompt = Prompt(token_ids=list(request.token_ids.ids))
    elif which == "chat":
        prompt = Prompt(messages=list(request.chat.messages))
    else:
        raise InvalidRequestError("the request has no prompt: set text, token_ids or chat", "prompt")
    generation = GenerationRequest(prompt=prompt, params=sampling_params_from_proto(request.sampling_params),
                                   model=request.model or None, skip_special_tokens=request.skip_special_tokens)
    if request.request_id:
        generation.request_id = internal_request_id(request.request_id)
    return generation


def chunk_from_event(event: SequenceEvent, request_id: str) -> gateway_pb2.GatewayGenerateChunk:
    chunk = gateway_pb2.GatewayGenerateChunk(
        text_delta=event.text, token_ids=event.token_ids, logprobs=event.logprobs,
        finish_reason=finish_reason_to_proto(event.finish_reason), index=event.index, request_id=request_id,
        stop=event.stop if isinstance(event.stop, str) else "",
        message=str(event.error) if event.error is not None else "")
    if isinstance(event.stop, int):
        chunk.stop_token_id = event.stop
    if event.usage is not None:
        chunk.usage.CopyFrom(event.usage)
    return chunk
