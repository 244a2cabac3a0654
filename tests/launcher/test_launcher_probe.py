import http.server
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.launcher import probe
from splitserve.launcher.ports import free_ports


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_grpc_probe_passes_only_when_serving(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with pytest.raises(probe.NotReady, match="NOT_SERVING"):
        probe.check_grpc(address)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    probe.check_grpc(address)
    assert probe.is_ready("grpc", address)


def test_grpc_probe_of_a_closed_port_fails_fast():
    [port] = free_ports(1)
    with pytest.raises(probe.NotReady, match="UNAVAILABLE"):
        probe.check_grpc(f"127.0.0.1:{port}", timeout_s=2)


class _Status(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(_Status.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_probe_wants_200(http_server):
    _Status.status = 503
    with pytest.raises(probe.NotReady, match="HTTP 503"):
        probe.check_http(http_server + "/health")
    _Status.status = 200
    probe.check_http(http_server + "/health")
    assert not probe.is_ready("http", http_server + "/missing")


def test_probe_command_exit_status_and_reason(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.main(["grpc", address]) == 0
    [port] = free_ports(1)
    assert probe.main(["http", f"http://127.0.0.1:{port}/health", "--timeout-s", "1"]) == 1
    assert "not ready: GET" in capsys.readouterr().err
