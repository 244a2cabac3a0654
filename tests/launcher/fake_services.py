"""Stand-ins for the five services, speaking only what the launcher relies on: the command line, grpc.health.v1
on the gRPC port, GET /health on the gateway's HTTP port, exit 0 on SIGTERM.

Run as `python fake_services.py <role> [service flags] [--fake-crash | --fake-unhealthy]`; env
FAKE_UNHEALTHY=role,role makes those roles unhealthy too (for `splitserve up`, which takes no per-role flags).
It prints its argv as one JSON line first, so tests can read the flags a role was given from its log.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class _GatewayHTTP(http.server.BaseHTTPRequestHandler):
    """GET /health; GET /stream (three SSE events 0.5 s apart, to see that Envoy does not buffer a stream);
    POST /reset (counts the request, then resets the connection without answering) and GET /resets (the count),
    to see that Envoy never replays a request that reached the gateway; any other POST is counted (GET /bodies),
    to see what Envoy lets through."""

    protocol_version = "HTTP/1.1"
    resets = 0
    bodies = 0

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.split("?")[0] == "/health":  # the launcher asks /health?all=true
            self._reply(200, b'{"status":"ok"}')
        elif self.path == "/resets":
            self._reply(200, json.dumps({"resets": _GatewayHTTP.resets}).encode())
        elif self.path == "/bodies":
            self._reply(200, json.dumps({"bodies": _GatewayHTTP.bodies}).encode())
        elif self.path == "/stream":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                event = f"data: {i} {time.time()}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.5)
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._reply(404, b"{}")

    def do_POST(self):
        if self.path == "/reset":
            _GatewayHTTP.resets += 1
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            # SO_LINGER 0: close with a TCP RST, the way a crashed gateway looks from Envoy.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        else:
            _GatewayHTTP.bodies += 1
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._reply(404, b"{}")

    def log_message(self, *args):
        pass


def main() -> int:
    role = sys.argv[1]
    print(json.dumps({"role": role, "argv": sys.argv[2:], "pid": os.getpid(),
                      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                      "api_key_env": os.environ.get("SPLITSERVE_API_KEY")}), flush=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--fake-crash", action="store_true")
    parser.add_argument("--fake-unhealthy", action="store_true")
    args, _ = parser.parse_known_args(sys.argv[2:])
    args.fake_unhealthy |= role in os.environ.get("FAKE_UNHEALTHY", "").split(",")
    if args.fake_crash:
        print(f"{role}: cannot load the model (fake crash)", flush=True)
        return 3

    grpc_port = args.grpc_port if role == "gateway" else args.port
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{args.host}:{grpc_port}") == 0:
        print(f"{role}: cannot bind {grpc_port}", flush=True)
        return 4
    server.start()
    serving = health_pb2.HealthCheckResponse
    servicer.set("", serving.NOT_SERVING if args.fake_unhealthy else serving.SERVING)
    if role == "gateway":
        httpd = http.server.ThreadingHTTPServer((args.host, args.port), _GatewayHTTP)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    stopped.wait()
    print(f"{role}: SIGTERM, exiting", flush=True)
    server.stop(grace=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
