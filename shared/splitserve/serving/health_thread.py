"""grpc.health.v1 on a port and thread of its own, so a health check is answered while the service's event loop
is saturated.

Every RPC on the service's aio server runs on its one event loop, and a health check needs a few turns of that
loop; with a thousand streams each turn is long (1,024 streams on a 2-core machine: health answered in up to
0.9 s, against the gateway's 1 s timeout). This server has its own completion queue and threads, so it waits
only for the GIL, never behind the streams. Its status mirrors the main server's (set by GrpcService), so a
draining worker says NOT_SERVING on both. A gateway learns the port from the worker's membership proof.

Answering off the loop must not hide a loop that is stuck rather than busy, so the loop beats a heartbeat and
this server says NOT_SERVING once the loop has missed `stall_s` of beats (a busy loop turns within about a
second).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

BEAT_S = 0.5
STALL_S = 10.0


class _LoopAwareHealth(health.HealthServicer):
    def __init__(self, server: "ThreadedHealthServer"):
        super().__init__()
        self._server = server

    def Check(self, request, context):
        reply = super().Check(request, context)
        if reply.status == health_pb2.HealthCheckResponse.SERVING and self._server.loop_stalled():
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return reply


class ThreadedHealthServer:
    def __init__(self, host: str, port: int = 0, stall_s: float = STALL_S):
        self.stall_s = stall_s
        self._last_beat = time.monotonic()
        self._stall_logged = False
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                                   options=[("grpc.so_reuseport", 0)])
        self._servicer = _LoopAwareHealth(self)
        self._servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # until the service says otherwise
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"cannot listen for health checks on {host}:{port}")

    def start(self) -> None:
        self._server.start()

    def set(self, service: str, status: int) -> None:
        """Thread-safe: called from the service's event loop."""
        self._servicer.set(service, status)

    async def beat(self) -> None:
        """Runs on the service's event loop until cancelled; each beat says the loop still turns."""
        while True:
            self._last_beat = time.monotonic()
            await asyncio.sleep(BEAT_S)

    def loop_stalled(self) -> bool:
        stalled_s = time.monotonic() - self._last_beat
        stalled = stalled_s > self.stall_s
        if stalled and not self._stall_logged:
            log.error("the event loop has not turned for %.1f s: health says NOT_SERVING until it does", stalled_s)
        self._stall_logged = stalled
        return stalled

    def stop(self) -> None:
        self._server.stop(grace=None)
