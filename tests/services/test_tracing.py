"""Tracing (splitserve.serving.tracing) in one process: off, nothing is installed and no call carries trace
context; on, a real grpc.aio server and channel (the services' own GrpcService and insecure_channel) propagate
W3C trace context and link client and server spans. The whole stack's trace is tests/e2e/test_traces_across_services.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from splitserve.kv_transfer.store_client import StoreChannels
from splitserve.serving import tracing
from splitserve.serving.grpc_service import GrpcService, insecure_channel
from splitserve.services.gateway.server import Gateway, GatewaySettings

METHOD = "/test.Echo/Call"
CLIENT_TRACEPARENT = f"00-{'1' * 32}-{'2' * 16}-01"


@pytest.fixture(autouse=True)
def no_tracing_left(monkeypatch):
    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    yield
    tracing.shutdown()


@contextlib.asynccontextmanager
async def _echo_server(starts_traces: bool = False):
    """`async with`: the address of a GrpcService whose methods answer what they saw: the metadata's
    traceparent and whether a span is current in the handler."""
    service = GrpcService("test", "127.0.0.1", 0, None, [], starts_traces=starts_traces)

    async def call(request: bytes, context) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        if request == b"fail":
            await context.abort(grpc.StatusCode.INTERNAL, "asked to fail")
        current = trace.get_current_span().get_span_context()
        return f"{metadata.get('traceparent', '-')} {current.is_valid}".encode()

    async def stream(request: bytes, context):
        yield await call(request, context)
        await asyncio.sleep(0.2 if request == b"slow" else 0)   # time for a caller to cancel
        yield await call(request, context)

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(call), "Stream": grpc.unary_stream_rpc_method_handler(stream)})
    service.server.add_generic_rpc_handlers((handler,))
    port = service.server.add_insecure_port("127.0.0.1:0")
    await service.server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await service.server.stop(None)


async def _call(address: str, request: bytes = b"hi", traceparent: str = "") -> str:
    metadata = (("traceparent", traceparent),) if traceparent else None
    async with insecure_channel(address) as channel:
        return (await channel.unary_unary(METHOD)(request, metadata=metadata, timeout=10)).decode()


async def _stream(address: str) -> list[str]:
    async with insecure_channel(address) as channel:
        return [reply.decode() async for reply in channel.unary_stream("/test.Echo/Stream")(b"hi", timeout=10)]


def _remote_parent() -> trace.Span:
    """A valid span context, as a request with tracing on would have current."""
    return trace.NonRecordingSpan(SpanContext(trace_id=0x1234, span_id=0x5678, is_remote=False,
                                              trace_flags=TraceFlags(TraceFlags.SAMPLED)))


def test_off_by_default_nothing_is_installed_and_no_metadata_is_sent():
    assert tracing.setup_service("gateway", GatewaySettings()) is False
    assert not tracing.enabled()
    assert tracing.server_interceptors(starts_traces=True) == [] and tracing.client_interceptors("h:1") == []
    assert not hasattr(trace.get_tracer_provider(), "add_span_processor")  # the API's proxy, not an SDK provider

    async def made_off():   # aio channels made inside a loop: an earlier test may have left none set
        gateway = Gateway(GatewaySettings())
        stores = StoreChannels()
        stores.stub("127.0.0.1:1")
        [(store_channel, _)] = stores._channels.values()
        return gateway, [insecure_channel("127.0.0.1:1"), store_channel]

    gateway, channels = asyncio.run(made_off())
    assert all(m.cls is not tracing._HttpTracing for m in gateway.app.user_middleware)
    for channel in channels:
        assert not channel._unary_unary_interceptors and not channel._unary_stream_interceptors

    async def go():
        async with _echo_server(starts_traces=True) as address:
            with trace.use_span(_remote_parent()):
                seen_inside_a_span = await _call(address)
            # A client's own traceparent is not continued either: the server has no interceptor.
            return seen_inside_a_span, await _call(address, traceparent=CLIENT_TRACEPARENT)

    seen_inside_a_span, sent = asyncio.run(go())
    assert seen_inside_a_span == "- False"
    assert sent.endswith(" False")


def test_off_a_service_never_loads_the_tracing_sdk_or_the_exporter():
    script = ("import sys; from splitserve.serving import tracing; "
              "from splitserve.services.gateway.server import Gateway, GatewaySettings; "
              "assert not tracing.setup_service('gateway', GatewaySettings()); Gateway(GatewaySettings()); "
              "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
              "'opentelemetry.exporter'))))")
    env = {k: v for k, v in os.environ.items() if k != tracing.ENDPOINT_ENV}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_on_calls_carry_traceparent_and_server_spans_are_children_of_client_spans():
    exporter = InMemorySpanExporter()
    assert tracing.setup("splitserve-test", None, exporter=exporter)

    async def go():
        async with _echo_server() as address:
            outside = await _call(address)            # no current span: a background call, not traced
            with trace.use_span(_remote_parent()), tracing.span("request") as request:
                inside = await _call(address)
                streamed = await _stream(address)
                with pytest.raises(grpc.aio.AioRpcError):
                    await _call(address, b"fail")
                async with insecure_channel(address) as channel:   # health checks are never traced
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            await asyncio.sleep(0.05)                 # client spans end in a task right after their call
        return outside, inside, streamed, request.get_span_context()

    outside, inside, streamed, request = asyncio.run(go())
    tracing.shutdown()
    assert outside == "- False"
    traceparent, server_saw_span = inside.split()
    assert server_saw_span == "True"
    assert len({reply.split()[0] for reply in streamed}) == 1 and {r.split()[1] for r in streamed} == {"True"}
    assert traceparent.split("-")[1] == format(request.trace_id, "032x")

    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {request.trace_id}
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert sorted(s.name for s in clients) == sorted(s.name for s in servers) == [
        "test.Echo/Call", "test.Echo/Call", "test.Echo/Stream"]
    for client in clients:
        assert client.parent.span_id == request.span_id
        assert client.attributes["server.address"] == "127.0.0.1" and client.attributes["rpc.system"] == "grpc"
    for server in servers:
        [client] = [c for c in clients if c.context.span_id == server.parent.span_id]
        assert server.attributes["rpc.grpc.status_code"] == client.attributes["rpc.grpc.status_code"]
    failed = [s for s in spans if s.attributes.get("rpc.grpc.status_code") == grpc.StatusCode.INTERNAL.value[0]]
    assert sorted(s.kind.name for s in failed) == ["CLIENT", "SERVER"] and not any(s.status.is_ok for s in failed)
    assert all(s.status.is_unset for s in spans if s not in failed)
    assert traceparent.split("-")[2] in {format(c.context.span_id, "016x") for c in clients}


def test_a_stream_its_caller_cancels_is_no_error_on_either_side():
    exporter = InMemorySpanExporter()
    tracing.setup("splitserve-test", None, exporter=exporter)

    async def go():
        async with _echo_server() as address, insecure_channel(address) as channel:
            with trace.use_span(_remote_parent()):
                call = channel.unary_stream("/test.Echo/Stream")(b"slow", timeout=10)
                await call.read()
                call.cancel()     # as the gateway does once a sequence's last token is in
            await asyncio.sleep(0.3)

    asyncio.run(go())
    tracing.shutdown()
    spans = exporter.get_finished_spans()
    assert sorted(s.kind.name for s in spans) == ["CLIENT", "SERVER"]
    assert all(s.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0] for s in spans)
    assert all(s.status.is_unset for s in spans)


def test_the_public_server_starts_a_trace_and_continues_a_callers():
    exporter = InMemorySpanExporter()
    tracing.setup("splitserve-test", None, exporter=exporter)

    async def go():
        async with _echo_server(starts_traces=True) as address:
            return await _call(address), await _call(address, traceparent=CLIENT_TRACEPARENT)

    root, continued = asyncio.run(go())
    tracing.shutdown()
    assert root.endswith(" True") and continued.endswith(" True")
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.start_time)
    assert [s.kind for s in spans] == [SpanKind.SERVER, SpanKind.SERVER]
    assert spans[0].parent is None
    assert spans[1].context.trace_id == int("1" * 32, 16) and spans[1].parent.span_id == int("2" * 16, 16)


def test_traced_steps_keeps_its_span_current_only_while_a_step_runs():
    exporter = InMemorySpanExporter()
    tracing.setup("splitserve-test", None, exporter=exporter)

    async def produce():
        for i in range(3):
            yield trace.get_current_span().get_span_context().span_id
            await asyncio.sleep(0)

    async def go():
        assert tracing.start_span("no parent") is trace.INVALID_SPAN   # outside a request: no trace starts
        never_iterated = tracing.traced_steps("never", {}, lambda owner: produce())
        seen, between, owners = [], [], []
        with trace.use_span(_remote_parent()) as parent:
            async for span_id in tracing.traced_steps("owner", {}, lambda owner: owners.append(owner) or produce()):
                seen.append(span_id)
                between.append(trace.get_current_span() is parent)
        await never_iterated.aclose()
        return owners, seen, between

    [owner], seen, between = asyncio.run(go())
    tracing.shutdown()
    assert seen == [owner.get_span_context().span_id] * 3
    assert between == [True] * 3                      # the consumer's context is its own
    [finished] = exporter.get_finished_spans()
    assert finished.name == "owner" and finished.parent.span_id == 0x5678


def test_failed_exports_are_counted_and_logged_never_raised(caplog):
    class Refusing:
        def __init__(self, fail):
            self.fail = fail

        def export(self, spans):
            if self.fail == "raise":
                raise ConnectionError("collector down")
            return SpanExportResult.FAILURE

    before = tracing.EXPORT_FAILURES._value.get()
    for fail in ("result", "raise"):
        assert tracing.CountedExporter(Refusing(fail), "http://collector").export([object()]) \
            is SpanExportResult.FAILURE
    assert tracing.EXPORT_FAILURES._value.get() == before + 2
    assert "collector down" in caplog.text and "could not export 1 spans to http://collector" in caplog.text


def test_a_collector_that_refuses_spans_costs_a_count_and_a_log_line(caplog):
    class Refusing(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_error(400)     # not retried by the exporter: the batch fails at once

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = tracing.EXPORT_FAILURES._value.get()
    try:
        assert tracing.setup("splitserve-test", f"http://127.0.0.1:{server.server_address[1]}")
        with trace.use_span(_remote_parent()), tracing.span("work") as span:
            assert span.is_recording()
        tracing.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert tracing.EXPORT_FAILURES._value.get() == before + 1
    assert "could not export 1 spans to http://127.0.0.1" in caplog.text


def test_endpoint_from_flag_or_env_and_the_default_path(monkeypatch):
    assert tracing.resolve_endpoint(None) is None
    assert tracing.resolve_endpoint("http://jaeger:4318") == "http://jaeger:4318/v1/traces"
    assert tracing.resolve_endpoint("http://tempo:4318/otlp/v1/traces") == "http://tempo:4318/otlp/v1/traces"
    monkeypatch.setenv(tracing.ENDPOINT_ENV, "http://collector:4318/")
    assert tracing.resolve_endpoint(None) == "http://collector:4318/v1/traces"
    assert tracing.resolve_endpoint("http://flag:4318") == "http://flag:4318/v1/traces"
    with pytest.raises(ValueError, match="http"):
        tracing.resolve_endpoint("collector:4317")
    with pytest.raises(SystemExit, match="gateway: otlp_traces_endpoint"):
        tracing.setup_service("gateway", GatewaySettings(otlp_traces_endpoint="grpc://collector:4317"))
