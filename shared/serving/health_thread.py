"""grpc.health.v1 on a port and thread of its own, so a health check is answered while the service's event loop
is saturated.

Every RPC on the service's aio server runs on its one event loop, and a health check needs a few turns of that
loop; with a thousand streams each turn is long (1,024 streams on a 2-core machine: health answered in up to
0.9 s, against the gateway's 1 s timeout). This server has its own completion queue and threads, so it waits
only for the GIL, never behind the streams. Its status mirrors the main server's (set by GrpcService), so a
draining worker says NOT_SERVING on both. A gateway learns the port from the worker's membership proof.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class ThreadedHealthServer:
    def __init__(self, host: str, port: int = 0):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                                   options=[("grpc.so_reuseport", 0)])
        self._servicer = health.HealthServicer()
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

    def stop(self) -> None:
        self._server.stop(grace=None)
