"""OpenTelemetry tracing of a request across the services: setup, gRPC interceptors, the gateway's HTTP middleware.

Off unless an OTLP endpoint is configured (`--otlp-traces-endpoint`, or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).
Off, nothing is installed: no tracer provider, no interceptor on any server or channel, no middleware, no
metadata on any call, and the helpers below return at their first test, so tracing costs nothing it does not use.
On, every gRPC call made while a span is current carries W3C `traceparent`/`tracestate` metadata and gets a client
span; the server it reaches continues that trace with a server span. Calls made outside a request (health checks,
the gateway's load polls) carry nothing and make no spans: a trace is one request, not background noise. Only the
gateway starts traces (`starts_traces`), and it continues a client's `traceparent` when one comes.

Spans go out in batches on the BatchSpanProcessor's thread over OTLP/HTTP protobuf; a batch that cannot be sent is
logged and counted (splitserve_trace_export_failures_total) and dropped, never seen by a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, Iterator, Mapping, Optional, Sequence, TypeVar
from urllib.parse import urlsplit

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter

from splitserve.setting import setting
from splitserve.kv_transfer import REQUEST_ID_METADATA_KEY

log = logging.getLogger(__name__)

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
TRACES_PATH = "/v1/traces"
REQUEST_ID_ATTRIBUTE = "splitserve.request.id"
_HEALTH_SERVICE = "/grpc.health.v1.Health/"
_UNTRACED_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapes, every few seconds

EXPORT_FAILURES = Counter("splitserve_trace_export_failures_total",
                          "Span batches the OTLP exporter could not deliver (their spans are dropped)")

T = TypeVar("T")
_propagator = TraceContextTextMapPropagator()   # W3C traceparent + tracestate
_tracer: Optional[trace.Tracer] = None
_provider = None                                 # the SDK's TracerProvider while tracing is on


def endpoint_field() -> Any:
    """The `otlp_traces_endpoint` setting every service (and `splitserve up`) has, with one help text."""
    return setting(None,
        f"send traces to this OTLP/HTTP collector, e.g. http://127.0.0.1:4318{TRACES_PATH} (a URL without "
                f"a path gets {TRACES_PATH}; unset: {ENDPOINT_ENV}, else no tracing)")


def resolve_endpoint(configured: Optional[str]) -> Optional[str]:
    """The collector URL: the setting, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; a bare host:port URL gets the
    standard traces path (Jaeger's and Tempo's OTLP receivers listen there)."""
    endpoint = configured or os.environ.get(ENDPOINT_ENV) or None
    if endpoint is None:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"otlp_traces_endpoint must be an http(s) URL, got {endpoint!r}")
    return endpoint if parts.path.strip("/") else endpoint.rstrip("/") + TRACES_PATH


def setup(service_name: str, endpoint: Optional[str], instance: Optional[str] = None, exporter=None) -> bool:
    """Turns tracing on for this process when an endpoint is configured (`exporter` replaces the OTLP one in
    tests); returns whether it is on. Call before building servers and channels: they ask enabled()."""
    global _tracer, _provider
    endpoint = resolve_endpoint(endpoint)
    if endpoint is None and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    attributes = {"service.name": service_name, "service.namespace": "splitserve"}
    if instance:
        attributes["service.instance.id"] = instance
    _provider = TracerProvider(resource=Resource.create(attributes))
    _provider.add_span_processor(BatchSpanProcessor(CountedExporter(exporter, endpoint or "a test exporter")))
    _tracer = _provider.get_tracer("splitserve")
    log.info("%s: tracing on, spans go to %s", service_name, endpoint or "a test exporter")
    return True


def setup_service(service: str, settings) -> bool:
    """setup() from a service's settings: its otlp_traces_endpoint, its host:port naming the instance."""
    try:
        return setup(f"splitserve-{service}", settings.otlp_traces_endpoint, f"{settings.host}:{settings.port}")
    except ValueError as exc:
        raise SystemExit(f"{service}: {exc}") from exc


def shutdown() -> None:
    """Sends what is buffered and turns tracing off (tests; a service's provider also flushes at exit)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def enabled() -> bool:
    return _tracer is not None


class CountedExporter:
    """Wraps the exporter so that a batch it could not deliver is counted and logged with the reason; the span
    processor drops the batch either way."""

    def __init__(self, inner, endpoint: str):
        self.inner = inner
        self.endpoint = endpoint

    def export(self, spans: Sequence) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.inner.export(spans)
            why = "the collector refused them or could not be reached"
        except Exception as exc:  # an exporter bug must not end the export thread
            result, why = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        if result is not SpanExportResult.SUCCESS:
            EXPORT_FAILURES.inc()
            log.warning("could not export %d spans to %s (%s); they are dropped", len(spans), self.endpoint, why)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


@contextlib.contextmanager
def span(name: str, attributes: Optional[Mapping[str, Any]] = None) -> Iterator[Span]:
    """`with`: an internal span of the current trace, current for the body; a non-recording one when tracing is
    off or no trace is current (work outside a traced request starts no trace). Never across a `yield` of a
    generator: the body's context would leak to the generator's caller."""
    if not _in_trace():
        yield trace.INVALID_SPAN
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def start_span(name: str, attributes: Optional[Mapping[str, Any]] = None) -> Span:
    """A span that the caller ends, child of the current one (see traced_steps); non-recording as span() is."""
    if not _in_trace():
        return trace.INVALID_SPAN
    return _tracer.start_span(name, attributes=attributes)


def _in_trace() -> bool:
    return _tracer is not None and trace.get_current_span().get_span_context().is_valid


def annotate(attributes: Mapping[str, Any]) -> None:
    """Adds attributes to the current span (a server span in a handler); nothing when tracing is off."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(attributes)


async def traced_steps(name: str, attributes: Mapping[str, Any],
                       make_items: Callable[[Span], AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of `make_items(owner)`, each step run with the span `owner` current (calls made while producing
    an item are its children); `owner` starts with the first step, as a child of the consumer's current span,
    and ends with the stream (a stream never iterated leaves no span open). The context is attached and
    detached within one step: never held across a yield, where it would become the consumer's."""
    owner = start_span(name, attributes)
    items = make_items(owner)
    try:
        while True:
            token = otel_context.attach(trace.set_span_in_context(owner))
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield item
    except BaseException as exc:
        if not isinstance(exc, GeneratorExit):
            owner.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        await items.aclose()
        owner.end()


# gRPC ---------------------------------------------------------------------------------------------------------

# Server spans are errors only for these codes (OpenTelemetry's gRPC conventions: the others are the caller's);
# client spans for any code but OK and CANCELLED (the caller's own choice: the gateway cancels a decode stream
# once its last token is in, and every stream whose client went away).
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                            grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


def _rpc_attributes(method: str) -> dict[str, Any]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def server_interceptors(starts_traces: bool = False) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors: none when tracing is off. `starts_traces`: a call without `traceparent` starts
    a trace (the gateway's public API); otherwise such a call is not traced."""
    return [_ServerTracing(starts_traces)] if _tracer is not None else []


def client_interceptors(address: str) -> list:
    """A channel's interceptors for calls to `address`: none when tracing is off."""
    if _tracer is None:
        return []
    return [kind(address) for kind in (_UnaryUnaryTracing, _UnaryStreamTracing, _StreamUnaryTracing,
                                       _StreamStreamTracing)]


class _ServerTracing(grpc.aio.ServerInterceptor):
    def __init__(self, starts_traces: bool):
        self.starts_traces = starts_traces

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_HEALTH_SERVICE):
            return handler
        metadata = {item[0]: item[1] for item in (details.invocation_metadata or ())}
        parent = _propagator.extract(metadata)
        if not self.starts_traces and not trace.get_current_span(parent).get_span_context().is_valid:
            return handler
        attributes = _rpc_attributes(method)
        if REQUEST_ID_METADATA_KEY in metadata:
            attributes[REQUEST_ID_ATTRIBUTE] = metadata[REQUEST_ID_METADATA_KEY]
        return _wrap_handler(handler, lambda context: _server_span(method, parent, attributes, context))


def _wrap_handler(handler, start):
    """`handler` with its behaviour run inside a server span; handlers that are not coroutines are left alone."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):
        async def streamed(request, context):
            with start(context):
                async for response in behavior(request, context):
                    yield response
        return handler._replace(**{kind: streamed})
    if inspect.iscoroutinefunction(behavior):
        async def unary(request, context):
            with start(context):
                return await behavior(request, context)
        return handler._replace(**{kind: unary})
    return handler


@contextlib.contextmanager
def _server_span(method: str, parent, attributes: dict, context) -> Iterator[None]:
    with _tracer.start_as_current_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                                       attributes=attributes, record_exception=False,
                                       set_status_on_exception=False) as current:
        try:
            yield
        except BaseException as exc:
            code = context.code()  # set by context.abort(); None when the handler raised on its own
            if not isinstance(code, grpc.StatusCode):
                # The caller left (a stream closed at a yield, or the handler's task cancelled).
                code = (grpc.StatusCode.CANCELLED if isinstance(exc, (asyncio.CancelledError, GeneratorExit))
                        else grpc.StatusCode.UNKNOWN)
            current.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in _SERVER_ERRORS:
                current.set_status(Status(StatusCode.ERROR, f"{code.name}: {context.details() or type(exc).__name__}"))
            raise
        current.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])


class _ClientTracing:
    """A client span per call made while a span is current, and its context in the call's metadata."""

    def __init__(self, address: str):
        host, _, port = address.rpartition(":")
        self.peer = {"server.address": host.strip("[]")}
        if port.isdigit():
            self.peer["server.port"] = int(port)
        self._ending: set[asyncio.Task] = set()

    async def _intercept(self, continuation, details, request):
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if not trace.get_current_span().get_span_context().is_valid or method.startswith(_HEALTH_SERVICE):
            return await continuation(details, request)
        current = _tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT,
                                     attributes={**_rpc_attributes(method), **self.peer})
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(current))
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()), *carrier.items())
        try:
            call = await continuation(details._replace(metadata=metadata), request)
        except BaseException as exc:
            current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            current.end()
            raise
        call.add_done_callback(lambda done: self._ended(current, done, time.time_ns()))
        return call

    def _ended(self, current: Span, call, end_time: int) -> None:
        """A done callback cannot await the call's status, so a task reads it (at once: the call is over)."""
        task = asyncio.get_running_loop().create_task(_end_client_span(current, call, end_time))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)


# A channel files each interceptor under the first of the four kinds it is (an if/elif chain), so one per kind.
class _UnaryUnaryTracing(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _ClientTracing._intercept


class _UnaryStreamTracing(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _ClientTracing._intercept


class _StreamUnaryTracing(_ClientTracing, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _ClientTracing._intercept


class _StreamStreamTracing(_ClientTracing, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _ClientTracing._intercept


async def _end_client_span(current: Span, call, end_time: int) -> None:
    try:
        code = await call.code()
        current.set_attribute("rpc.grpc.status_code", code.value[0])
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            current.set_status(Status(StatusCode.ERROR, f"{code.name}: {await call.details()}"))
    except Exception as exc:  # a cancelled call may have no status to read
        current.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    finally:
        current.end(end_time=end_time)


# HTTP ---------------------------------------------------------------------------------------------------------

def install_http(app) -> None:
    """Adds the server-span middleware to the gateway's ASGI app; nothing when tracing is off."""
    if _tracer is not None:
        app.add_middleware(_HttpTracing)


class _HttpTracing:
    """A server span per HTTP request (probes and scrapes aside), continuing the client's `traceparent`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        method = scope["method"]
        with _tracer.start_as_current_span(f"{method} {scope['path']}", context=_propagator.extract(headers),
                                           kind=SpanKind.SERVER, attributes={
                                               "http.request.method": method, "url.path": scope["path"]}) as current:
            async def send_traced(message):
                if message["type"] == "http.response.start":
                    status = message["status"]
                    current.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        current.set_status(Status(StatusCode.ERROR))
                await send(message)

            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = scope.get("route")
                if getattr(route, "path", None):  # the template, not the path: names stay few (/v1/models/{id})
                    current.update_name(f"{method} {route.path}")
                    current.set_attribute("http.route", route.path)
