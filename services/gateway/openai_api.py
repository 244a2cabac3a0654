"""The OpenAI-compatible HTTP API: routes, admission, streaming as server-sent events.

Every failure leaves as an OpenAI error body (openai_errors.py), including a body that is too large, not JSON
or of the wrong shape (request_body.py: 413 or 400, not FastAPI's 422). A streamed response starts only once
the request produced its first event, so failures up to then (no worker, bad parameter found by prefill) still
get their HTTP status; later failures end the stream with an error event and `[DONE]`, never a hang.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from splitserve.serving import tracing
from splitserve.services.gateway import metrics, model_api, openapi_doc, overhead
from splitserve.services.gateway.model_api import add_model_routes
from splitserve.services.gateway.openapi_doc import json_body, responses, server_version
from splitserve.services.gateway.response_schemas import (ChatCompletionResponse, CompletionResponse, ErrorResponse,
                                                          HealthResponse)
from splitserve.services.gateway.admission import Admission, Ticket
from splitserve.services.gateway.auth import check_api_key
from splitserve.services.gateway.openai_errors import describe, error_body, error_response
from splitserve.services.gateway.openai_format import ResponseFormatter
from splitserve.services.gateway.outputs import SequenceEvent, collect
from splitserve.services.gateway.pipeline import Pipeline, PreparedRequest, batch_usage, internal_request_id
from splitserve.services.gateway.schemas import ChatCompletionRequest, CompletionRequest
from splitserve.services.gateway.errors import ShutdownError
from splitserve.services.gateway.request_body import parse_body
from splitserve.services.gateway.sse import DONE, ClientDisconnected, EventStreamResponse, run_for_client, sse_event

log = logging.getLogger(__name__)

# nginx's status for "the client closed the connection before the response"; only ever seen in metrics.
CLIENT_CLOSED = 499
REQUEST_ID_HEADER = "x-request-id"
_GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503, 504)


@dataclass
class ApiState:
    pipeline: Pipeline
    admission: Admission
    api_key: Optional[str]
    healthy: Callable[..., Optional[str]]           # None when healthy, else why not (every_worker=True: all)
    max_body_bytes: int = 8 * 2**20
    tool_call_parser: Optional[str] = None          # tool_choice "auto" parses output with it (tool_parsers)


def build_app(state: ApiState) -> FastAPI:
    app = FastAPI(title="splitserve gateway", version=server_version(), docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    openapi_doc.install(app, [CompletionRequest, ChatCompletionRequest, *model_api.REQUEST_MODELS])
    tracing.install_http(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest),
              responses=responses(CompletionResponse, *_GENERATION_ERRORS, streams=True))
    async def completions(request: Request) -> Response:
        return _echo_request_id(request, await _generate(state, request, CompletionRequest, chat=False))

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest),
              responses=responses(ChatCompletionResponse, *_GENERATION_ERRORS, streams=True))
    async def chat_completions(request: Request) -> Response:
        return _echo_request_id(request, await _generate(state, request, ChatCompletionRequest, chat=True))

    add_model_routes(app, state.pipeline, state.api_key, state.max_body_bytes)

    @app.get("/health", responses={200: {"model": HealthResponse}, 503: {"model": HealthResponse}})
    async def health(all: bool = False) -> Response:
        """`?all=true`: 200 only once every known worker is healthy (the launcher waits for that)."""
        why_not = "draining" if state.admission.draining else state.healthy(every_worker=all)
        if why_not is not None:
            return JSONResponse({"status": "unavailable", "reason": why_not}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: {"model": ErrorResponse}})
    async def prometheus_metrics(request: Request) -> Response:
        # Behind the key like the API (Prometheus without it scrapes --metrics-port, which is not public).
        try:
            check_api_key(request.headers.get("authorization"), state.api_key)
        except Exception as exc:
            return error_response(exc)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def _echo_request_id(request: Request, response: Response) -> Response:
    """The client's X-Request-Id comes back as it was sent, whatever the internal id (pipeline.internal_request_id)."""
    client_id = request.headers.get(REQUEST_ID_HEADER)
    if client_id:
        response.headers[REQUEST_ID_HEADER] = client_id
    return response


async def _generate(state: ApiState, request: Request,
                    schema: type[Union[CompletionRequest, ChatCompletionRequest]], chat: bool) -> Response:
    endpoint = "chat_completions" if chat else "completions"
    timer = overhead.start_request()
    ticket: Optional[Ticket] = None
    try:
        check_api_key(request.headers.get("authorization"), state.api_key)
        body = await parse_body(request, schema, state.max_body_bytes)
        generations = body.to_generation_requests()
        tool_parser = body.tool_choice_plan().output_parser(state.tool_call_parser) if chat else None
        client_id = request.headers.get(REQUEST_ID_HEADER)
        if client_id:
            for generation in generations:
                generation.request_id = internal_request_id(client_id)
            log.info("request %s: X-Request-Id %s", ", ".join(g.request_id for g in generations), client_id)
        ticket = await run_for_client(request, state.admission.admit(), asyncio.Event())
        batch = await run_for_client(request, state.pipeline.prepare_batch(generations), ticket.aborted)
        formatter = ResponseFormatter(chat=chat, request_id=batch[0].request_id, model=batch[0].model,
                                      want_logprobs=batch[0].params.logprobs is not None,
                                      echo_logprobs=getattr(body, "echo_logprobs", None),
                                      prompt_logprobs=body.prompt_logprobs, tool_parser=tool_parser)
        events = state.pipeline.generate_batch(batch)
        if body.stream:
            try:
                first = await run_for_client(request, anext(events), ticket.aborted)
                if first.error is not None:   # failed before producing anything: a plain HTTP error
                    raise first.error
            except BaseException:
                await events.aclose()
                raise
            stream = _StreamState(endpoint, ticket, timer)
            aborted, ticket = ticket.aborted, None  # the stream releases the ticket when it ends
            return EventStreamResponse(
                _sse(formatter, batch, first, events, body.include_usage, stream), on_close=stream.close,
                abort=aborted, abort_text=sse_event(describe(ShutdownError())[1]) + DONE)
        results = await run_for_client(request, collect(events, len(batch) * batch[0].params.n), ticket.aborted)
        for result in results:
            if result.error is not None:
                raise result.error
        usage = batch_usage(batch, {r.index: r.usage for r in results})
        response = JSONResponse(formatter.response(results, usage))
        timer.finish()
        return metrics.count_response(endpoint, response)
    except ClientDisconnected:
        log.info("%s: client disconnected before the response; request cancelled", endpoint)
        return metrics.count_response(endpoint, Response(status_code=CLIENT_CLOSED))
    except Exception as exc:
        return metrics.count_response(endpoint, error_response(exc))
    finally:
        if ticket is not None:
            ticket.release()


class _StreamState:
    """What a streamed response reports when it ends: its status and the gateway's own time for the metrics, its
    admission release."""

    def __init__(self, endpoint: str, ticket: Ticket, timer: overhead.RequestTimer):
        self.endpoint = endpoint
        self.ticket = ticket
        self.timer = timer
        self.status = CLIENT_CLOSED   # until the stream reaches its end

    def close(self) -> None:
        if self.ticket.aborted.is_set() and self.status != 200:
            self.status = 503
        if self.status == 200:
            self.timer.finish()
        metrics.REQUESTS.labels(self.endpoint, str(self.status)).inc()
        self.ticket.release()


async def _sse(formatter: ResponseFormatter, batch: list[PreparedRequest], first: SequenceEvent,
               events: AsyncIterator[SequenceEvent], include_usage: bool, state: _StreamState) -> AsyncIterator[str]:
    usages = {}
    try:
        if formatter.chat:   # chat has one prompt
            for index in range(batch[0].params.n):
                yield sse_event(formatter.role_chunk(index, include_usage))
        event: Optional[SequenceEvent] = first
        while event is not None:
            if event.error is not None:
                raise event.error
            if event.usage is not None:
                usages[event.index] = event.usage
            chunk = formatter.event_chunk(event, include_usage)
            if chunk is not None:
                yield sse_event(chunk)
            event = await anext(events, None)
        if include_usage:
            usage = batch_usage(batch, usages)
            yield sse_event(formatter.usage_chunk(usage))
        state.status = 200
    except Exception as exc:
        state.status, body = describe(exc)
        log.warning("request %s: stream ended by an error: %s", batch[0].request_id, exc)
        yield sse_event(body)
    yield DONE
