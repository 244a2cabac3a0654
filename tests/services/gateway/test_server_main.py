"""`splitserve gateway` as a real process: flags, both servers, health, SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import free_port


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the gateway did not become healthy")


def _grpc_health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=2).status


def test_gateway_process_serves_then_drains_on_sigterm(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.02})
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [sys.executable, "-m", "splitserve.services.cli", "gateway", "--port", str(http_port),
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--tokenizer-addresses", stack.tokenizer.address, "--decode-addresses", stack.decodes[0].address,
           "--grace-s", "10", "--log-level", "WARNING"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "SPLITSERVE_PREFILL_ADDRESSES": stack.prefills[0].address}   # settings from env too
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_healthy(url, proc)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert _grpc_health(f"127.0.0.1:{grpc_port}", "") == serving
        assert _grpc_health(f"127.0.0.1:{grpc_port}", "splitserve.v1.Gateway") == serving
        assert "splitserve_gateway_requests_total" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        with httpx.Client(base_url=url, timeout=20) as http:
            done = http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 2})
            assert done.json()["choices"][0]["text"] == " w11 w12"
            assert len(stack.prefill.requests) == 1
            with http.stream("POST", "/v1/completions",
                             json={"prompt": "x 10", "max_tokens": 40, "stream": True}) as in_flight:
                lines = in_flight.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                assert http.get("/health").status_code == 503
                assert _grpc_health(f"127.0.0.1:{grpc_port}", "") == health_pb2.HealthCheckResponse.NOT_SERVING
                rest = "\n".join(lines)
            assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
