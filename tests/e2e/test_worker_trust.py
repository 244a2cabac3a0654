"""Writing to the stack's Redis is not enough to receive user traffic: an impostor decode worker announced in the
registry (with the stack's own Redis credentials, the strongest case) is checked and refused, and every request
goes to the stack's real decode worker, which proves the cluster token `splitserve up` gave it."""

from __future__ import annotations

import re
import threading
import time
from concurrent import futures

import grpc
import httpx
import pytest
import redis
from e2e_stack import API_KEY
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from splitserve.worker_registry import WorkerInfo, registry_key

pytestmark = pytest.mark.timeout(300)


class ImpostorDecode(decode_pb2_grpc.DecodeServicer):
    """Serves the right model name and would happily take requests, but holds no cluster token."""

    def __init__(self, model: str):
        self.model = model
        self.generate_calls = 0
        self.stats_calls = 0

    def Stats(self, request, context):
        self.stats_calls += 1
        return common_pb2.WorkerStatsResponse(engine=common_pb2.EngineStats(model=self.model))

    def Generate(self, request, context):
        self.generate_calls += 1
        yield decode_pb2.GenerateChunk(token_ids=[5], finish_reason=common_pb2.FINISH_REASON_LENGTH)


@pytest.fixture
def impostor(stack):
    servicer = ImpostorDecode(stack.model)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    client = redis.Redis.from_url(stack.redis_url)
    stop = threading.Event()

    def announce():  # what a worker's announcer does, written straight into the registry
        while not stop.is_set():
            info = WorkerInfo(address, "decode", stack.model, time.time())
            client.hset(registry_key("decode"), address, info.to_json())
            stop.wait(0.5)

    announcer = threading.Thread(target=announce, daemon=True)
    announcer.start()
    try:
        yield servicer
    finally:
        stop.set()
        announcer.join(5)
        client.hdel(registry_key("decode"), address)
        client.close()
        server.stop(None)


def _rejections(stack) -> float:
    text = httpx.get(f"{stack.http_url}/metrics", timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}).text
    match = re.search(r'^splitserve_gateway_worker_rejections_total\{kind="decode",reason="no_proof"\} (\S+)$',
                      text, re.M)
    return float(match.group(1)) if match else 0.0


def test_an_impostor_announced_in_redis_gets_no_requests(stack, impostor):
    deadline = time.monotonic() + 30
    while impostor.stats_calls == 0 or _rejections(stack) == 0:    # the gateway found it and checked it
        assert time.monotonic() < deadline, (impostor.stats_calls, _rejections(stack), stack.log_dir)
        time.sleep(0.2)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60, headers=headers) as http:
        model = http.get(f"{stack.base_url}/models").json()["data"][0]["id"]
        for i in range(12):
            response = http.post(f"{stack.base_url}/completions", json={
                "model": model, "prompt": f"request {i}", "max_tokens": 2, "temperature": 0.0})
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 2
    assert impostor.generate_calls == 0
