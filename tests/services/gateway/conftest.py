"""The gateway under test, in-process, against fake tokenizer/prefill/decode servers and a real Redis.

Everything asynchronous (fakes, the gateway's HTTP and gRPC servers) runs on one event loop in a background
thread, so tests drive it with ordinary blocking clients (openai, httpx) from the test thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
import httpx
import openai
import pytest
import redis

from splitserve.services.gateway import grpc_api
from splitserve.services.gateway.server import Gateway, GatewaySettings, HttpServer

from . import fakes

os.environ.setdefault("OMP_NUM_THREADS", "1")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture(scope="session")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def clean_redis(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.flushdb()
    client.close()


@dataclass
class RunningGateway:
    gateway: Gateway
    http: HttpServer
    grpc_server: grpc.aio.Server
    grpc_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=20)

    def http_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=20)


async def _start_gateway(settings: GatewaySettings) -> RunningGateway:
    gateway = Gateway(settings)
    server = grpc.aio.server(options=settings.grpc_server_options)
    grpc_api.add_to_server(gateway.servicer, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await gateway.start()
    await server.start()
    http = HttpServer(gateway.app, "127.0.0.1", 0, log_level="WARNING")
    await http.start()
    return RunningGateway(gateway, http, server, grpc_port)


@dataclass
class Stack:
    """Fakes plus a gateway in front of them; `start_gateway` may be called again with other settings."""
    loop: LoopThread
    tokenizer: fakes.FakeServer
    prefills: list[fakes.FakeServer]
    decodes: list[fakes.FakeServer]
    gateways: list[RunningGateway] = field(default_factory=list)
    extra_servers: list[fakes.FakeServer] = field(default_factory=list)

    @property
    def decode(self) -> fakes.FakeDecode:
        return self.decodes[0].servicer

    @property
    def prefill(self) -> fakes.FakePrefill:
        return self.prefills[0].servicer

    def start_gateway(self, static_workers: bool = True, **overrides: Any) -> RunningGateway:
        values = dict(tokenizer_addresses=[self.tokenizer.address], health_check_interval_s=0.2,
                      request_timeout_s=10.0, kv_store_address="127.0.0.1:50090")
        if static_workers:
            values.update(prefill_addresses=[s.address for s in self.prefills],
                          decode_addresses=[s.address for s in self.decodes])
        values.update(overrides)
        running = self.loop.run(_start_gateway(GatewaySettings(**values)))
        self.gateways.append(running)
        if static_workers:
            self._settle(running)
        return running

    def _settle(self, running: RunningGateway, timeout: float = 2.0) -> None:
        """Gives the gateway's pool up to `timeout` to see this stack's workers healthy: a first health check that
        found one not yet reachable (seen once in CI: connection refused) is redone 0.2 s later, and a test that
        sends at once would get UNAVAILABLE meanwhile. Tests that take a worker down on purpose wait no longer
        than that."""
        ours = {s.address for s in self.prefills + self.decodes}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
                w.healthy for kind in ("prefill", "decode") for w in running.gateway.pool.workers(kind)
                if w.address in ours):
            time.sleep(0.02)

    def start_server(self, factory: Callable[..., fakes.FakeServer], **kwargs: Any) -> fakes.FakeServer:
        server = self.loop.run(factory(**kwargs).start())
        self.extra_servers.append(server)
        return server

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            time.sleep(0.02)


@pytest.fixture
def make_stack(loop_thread):
    """make_stack(num_prefill=1, num_decode=1, tokenizer={...}, prefill={...}, decode={...}) -> Stack."""
    stacks: list[Stack] = []

    def make(num_prefill: int = 1, num_decode: int = 1, tokenizer: Optional[dict] = None,
             prefill: Optional[dict] = None, decode: Optional[dict] = None) -> Stack:
        async def start() -> Stack:
            tok = await fakes.tokenizer_server(**(tokenizer or {})).start()
            prefills = [await fakes.prefill_server(**(prefill or {})).start() for _ in range(num_prefill)]
            decodes = [await fakes.decode_server(**(decode or {})).start() for _ in range(num_decode)]
            return Stack(loop_thread, tok, prefills, decodes)

        stack = loop_thread.run(start())
        stacks.append(stack)
        return stack

    yield make

    async def stop(stack: Stack) -> list[str]:
        """Stops everything, each step bounded; returns the steps that did not finish in time."""
        steps = []
        for i, running in enumerate(stack.gateways):
            steps += [(f"gateway {i} http", running.http.stop()), (f"gateway {i} grpc", running.grpc_server.stop(None)),
                      (f"gateway {i} close", running.gateway.close())]
        steps += [(f"fake server {server.address}", server.stop())
                  for server in [stack.tokenizer, *stack.prefills, *stack.decodes, *stack.extra_servers]]
        hung = []
        for name, step in steps:
            task = asyncio.ensure_future(step)
            done, _ = await asyncio.wait({task}, timeout=10.0)
            if not done:
                hung.append(f"{name}: {_awaiting(task)}")
                task.cancel()
        return hung

    hung = [name for stack in stacks for name in loop_thread.run(stop(stack), timeout=120.0)]
    assert not hung, f"teardown steps did not finish within 10 s: {hung}"


def _awaiting(task: asyncio.Task) -> str:
    """Where a task is stuck: its chain of awaits, innermost last."""
    coro, chain = task.get_coro(), []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None)
    return " -> ".join(chain)


@pytest.fixture
def stack(make_stack) -> Stack:
    return make_stack()


@pytest.fixture
def gateway(stack) -> RunningGateway:
    return stack.start_gateway()
