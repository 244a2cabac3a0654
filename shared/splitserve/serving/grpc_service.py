"""Runs one service process: gRPC aio server, grpc.health.v1, Prometheus /metrics, and a graceful SIGTERM.

On SIGTERM (or SIGINT) health turns NOT_SERVING at once so load balancers and the gateway stop sending work,
then the service's own drain coroutine finishes or cancels in-flight work within `grace_s`, then the server
stops. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Iterable, Optional, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from splitserve.serving import tracing
from splitserve.serving.health_thread import ThreadedHealthServer

log = logging.getLogger(__name__)

# KV blocks and long prompts travel in single messages; gRPC's 4 MiB default is too small for either.
MAX_MESSAGE_BYTES = 256 * 2**20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Service-to-service calls are direct; an http_proxy in the environment must not capture them.
    ("grpc.enable_http_proxy", 0),
]


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A client channel with the same message limits as the servers (and the tracing interceptor when on)."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                     interceptors=tracing.client_interceptors(address) or None)


class GrpcService:
    def __init__(self, name: str, host: str, port: int, metrics_port: Optional[int],
                 service_names: Iterable[str], grace_s: float = 30.0,
                 options: Sequence[tuple[str, int]] = (), health_port: Optional[int] = None,
                 starts_traces: bool = False):
        """`options` override CHANNEL_OPTIONS of the same name (the gateway takes smaller public messages);
        `health_port` (0: any free one) adds a health-only server on its own thread (health_thread.py);
        `starts_traces`: a call without `traceparent` starts a trace (the public API) instead of going untraced."""
        self.name = name
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.service_names = list(service_names)
        self.grace_s = grace_s
        self.server = grpc.aio.server(options=list({**dict(CHANNEL_OPTIONS), **dict(options)}.items()),
                                      interceptors=tracing.server_interceptors(starts_traces) or None)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health_thread = ThreadedHealthServer(host, health_port) if health_port is not None else None
        self._stop = asyncio.Event()
        self.draining = False

    async def _set_health(self, status: int) -> None:
        for service in ["", *self.service_names]:
            result = self.health.set(service, status)
            if asyncio.iscoroutine(result):
                await result
            if self.health_thread is not None:
                self.health_thread.set(service, status)

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("%s: second stop signal, skipping the drain", self.name)
            self.grace_s = 0.0
        self._stop.set()

    async def run(self, drain: Optional[Callable[[], Awaitable[None]]] = None,
                  on_started: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        bound = self.server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise RuntimeError(f"{self.name}: cannot listen on {self.host}:{self.port}")
        self.port = bound
        await self.server.start()
        beat = None
        if self.health_thread is not None:
            self.health_thread.start()
            beat = asyncio.create_task(self.health_thread.beat(), name=f"{self.name}-loop-heartbeat")
        try:
            await self._serve(drain, on_started)
        finally:
            if self.health_thread is not None:
                beat.cancel()
                self.health_thread.stop()

    async def _serve(self, drain: Optional[Callable[[], Awaitable[None]]],
                     on_started: Optional[Callable[[], Awaitable[None]]]) -> None:
        if self.metrics_port is not None:
            start_http_server(self.metrics_port, addr=self.host)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if on_started is not None:
            await on_started()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        also = f", health also on :{self.health_thread.port}" if self.health_thread is not None else ""
        log.info("%s serving gRPC on %s:%d, metrics on :%s%s", self.name, self.host, self.port, self.metrics_port,
                 also)
        await self._stop.wait()
        self.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("%s draining (up to %.0f s)", self.name, self.grace_s)
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), timeout=max(self.grace_s, 0.01))
            except asyncio.TimeoutError:
                log.warning("%s: drain did not finish within %.0f s; cancelling what is left", self.name,
                            self.grace_s)
        await self.server.stop(grace=1.0)
        log.info("%s stopped", self.name)
