"""One chat request through the whole stack (Envoy, gateway, tokenizer, prefill, kv-store, decode: real processes
started by the launcher with --otlp-traces-endpoint) is one trace: every span the services export carries the
client's trace id, each service contributes spans, and each hop's server span is the child of its caller's client
span. The collector is a real OTLP/HTTP endpoint in this process, decoding what the services' exporters send."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)

API_KEY = "trace-key"
MODEL = "traced-llama"
SERVICES = ("gateway", "tokenizer", "prefill", "kv-store", "decode")
# Who calls whom: each server span of a service must be the child of a client span of one of these.
CALLERS = {"tokenizer": {"gateway"}, "prefill": {"gateway"}, "decode": {"gateway"}, "kv-store": {"prefill", "decode"}}


class Collector(ThreadingHTTPServer):
    """POST /v1/traces: OTLP/HTTP protobuf, kept as flat span records."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[dict] = []
        self.issued: set[str] = set()       # trace ids the tests' requests started
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    record = {"service": resource["service.name"].removeprefix("splitserve-"),
                              "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                              "parent": span.parent_span_id.hex(), "name": span.name, "kind": span.kind,
                              "error": span.status.code == Status.STATUS_CODE_ERROR,
                              "attributes": {a.key: _value(a.value) for a in span.attributes}}
                    with self.lock:
                        self.spans.append(record)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)


def _value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_error(404 if self.path != "/v1/traces" else 415)
            return
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.add(request)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def collector():
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def traced_stack(llama_ckpt, collector, tmp_path_factory):
    # Spans leave every 0.2 s instead of 5 s (the services inherit this environment).
    old = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "200"
    try:
        with Stack(model=str(llama_ckpt), prefill_workers=1, decode_workers=1, tokenizer_replicas=1,
                   api_key=API_KEY, served_model_name=[MODEL], torch_threads=1, num_kv_blocks=256, grace_s=3,
                   otlp_traces_endpoint=collector.endpoint,
                   # every prompt to the prefill worker: a request whose decode worker was predicted faster would
                   # have no prefill or kv-store span, and the test checks one span per hop
                   prefill_decider="threshold",
                   log_dir=str(tmp_path_factory.mktemp("trace-logs"))) as running:
            yield running
    finally:
        if old is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = old


def _wait_for_trace(collector: Collector, trace_id: str, timeout_s: float = 30.0) -> list[dict]:
    """The spans of `trace_id`, once each service has sent some and the gateway's request span (the last to
    end) is in."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in collector.snapshot() if s["trace"] == trace_id]
        services = {s["service"] for s in spans}
        request_done = any(s["service"] == "gateway" and s["kind"] == Span.SPAN_KIND_SERVER for s in spans)
        if (services >= set(SERVICES) and request_done) or time.monotonic() > deadline:
            time.sleep(0.5)     # late stragglers (the kv-store's release after decode) join the same trace
            return [s for s in collector.snapshot() if s["trace"] == trace_id]
        time.sleep(0.2)


def _chat(stack, collector: Collector, stream: bool) -> tuple[list[dict], str, dict, str]:
    """One chat request with a client trace context; its trace's spans, the client's span id, usage and finish
    reason."""
    client_trace, client_span = secrets.token_hex(16), secrets.token_hex(8)
    collector.issued.add(client_trace)
    # Several full KV blocks, prefill hands them over the store; a new prompt each time, or decode would find the
    # blocks in its own prefix cache and skip the kv-store.
    words = " ".join(f"word{i} {'streamed' if stream else 'whole'}" for i in range(40))
    body = {"model": MODEL, "messages": [{"role": "user", "content": words}], "max_tokens": 4, "temperature": 0,
            **({"stream": True, "stream_options": {"include_usage": True}} if stream else {})}
    response = httpx.post(f"{stack.base_url}/chat/completions", timeout=60, json=body, headers={
        "Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{client_trace}-{client_span}-01"})
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        usage = chunks[-1]["usage"]
        [finish] = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    else:
        usage, finish = response.json()["usage"], response.json()["choices"][0]["finish_reason"]
    spans = _wait_for_trace(collector, client_trace)
    strangers = [(s["service"], s["name"]) for s in collector.snapshot() if s["trace"] not in collector.issued]
    assert not strangers, f"a trace is one request: nothing else is traced, yet {strangers}"
    return spans, client_span, usage, finish


def _check_one_trace(spans: list[dict], client_span: str, usage: dict, finish: str) -> None:
    """A span from every service, each hop's server span the child of its caller's client span, and the
    request's facts on the generation span."""
    by_id = {s["id"]: s for s in spans}
    assert set(Counter(s["service"] for s in spans)) == set(SERVICES)
    [root] = [s for s in spans if s["parent"] == client_span]
    assert root["service"] == "gateway" and root["kind"] == Span.SPAN_KIND_SERVER
    assert root["name"] == "POST /v1/chat/completions" and root["attributes"]["http.response.status_code"] == 200
    for span in spans:
        if span is not root:
            assert span["parent"] in by_id, f"{span['service']} {span['name']} has no parent in the trace"
    assert not [(s["service"], s["name"]) for s in spans if s["error"]], "a request that succeeded has no error span"

    for span in (s for s in spans if s["kind"] == Span.SPAN_KIND_SERVER and s is not root):
        caller = by_id[span["parent"]]
        assert caller["kind"] == Span.SPAN_KIND_CLIENT and caller["name"] == span["name"], (span, caller)
        assert caller["service"] in CALLERS[span["service"]], (span, caller)
    hops = {(by_id[s["parent"]]["service"], s["service"]) for s in spans
            if s["kind"] == Span.SPAN_KIND_SERVER and s is not root}
    assert hops >= {("gateway", "tokenizer"), ("gateway", "prefill"), ("gateway", "decode"), ("prefill", "kv-store"),
                    ("decode", "kv-store")}

    [generation] = [s for s in spans if s["name"].startswith("chat ")]
    attributes = generation["attributes"]
    assert generation["parent"] == root["id"]
    assert attributes["gen_ai.request.model"] == MODEL
    assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == [finish]
    for role in ("prefill", "decode"):
        [server] = [s for s in spans if s["service"] == role and s["kind"] == Span.SPAN_KIND_SERVER]
        assert by_id[server["parent"]]["parent"] == generation["id"]      # the hop belongs to the generation
        assert server["attributes"]["splitserve.request.id"] == attributes["splitserve.request.id"]
    assert {s["name"] for s in spans} >= {"route decode", "route prefill", "kv put", "kv get"}


def test_one_chat_request_is_one_trace_with_a_span_per_hop(traced_stack, collector):
    _check_one_trace(*_chat(traced_stack, collector, stream=False))


def test_a_streamed_request_is_one_trace_too(traced_stack, collector):
    _check_one_trace(*_chat(traced_stack, collector, stream=True))
