"""The tokenizer service's Prometheus metrics: calls by method and status code, and how long they took."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter("splitserve_tokenizer_requests_total", "Tokenizer RPCs by method and final gRPC status code",
                   ["method", "code"])

# Calls take well under a millisecond for chat-sized prompts; whole documents take longer.
REQUEST_SECONDS = Histogram("splitserve_tokenizer_request_seconds", "Tokenizer RPC duration",
                            ["method"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0))


def record(method: str, code: str, seconds: float) -> None:
    REQUESTS.labels(method=method, code=code).inc()
    REQUEST_SECONDS.labels(method=method).observe(seconds)
