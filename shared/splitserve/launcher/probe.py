"""Readiness probes: grpc.health.v1 Check, HTTP GET, Redis PING.

The launcher polls these while the stack starts, and the containers run the same code as their health checks:
`python -m splitserve.launcher.probe grpc 127.0.0.1:50051` or `... http http://127.0.0.1:8080/health`
(exit 0 when ready, 1 when not, with the reason on stderr).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from typing import Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class NotReady(Exception):
    """Why a probe failed, worded for a person reading a start-up error or `docker inspect`."""


def check_grpc(address: str, timeout_s: float = 1.0, service: str = "") -> None:
    # A proxy from the environment must never sit between a probe and a local port.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise NotReady(f"gRPC health of {address}: {exc.code().name}") from exc
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        raise NotReady(f"gRPC health of {address}: {status}")


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check_http(url: str, timeout_s: float = 1.0) -> None:
    try:
        with _NO_PROXY.open(url, timeout=timeout_s) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        raise NotReady(f"GET {url}: {getattr(exc, 'reason', exc)}") from exc
    if status != 200:
        raise NotReady(f"GET {url}: HTTP {status}")


def check_redis(url: str, timeout_s: float = 1.0) -> None:
    import redis

    from splitserve.serving.settings import redact_url

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise NotReady(f"Redis at {redact_url(url)}: {exc}") from exc
    finally:
        client.close()


def is_ready(kind: str, target: str, timeout_s: float = 1.0) -> bool:
    try:
        CHECKS[kind](target, timeout_s)
    except NotReady:
        return False
    return True


CHECKS = {"grpc": check_grpc, "http": check_http, "redis": check_redis}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitserve.launcher.probe", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(CHECKS))
    parser.add_argument("target", help="HOST:PORT for grpc, a URL for http and redis")
    parser.add_argument("--timeout-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    try:
        CHECKS[args.kind](args.target, args.timeout_s)
    except NotReady as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
