"""Free TCP ports for the stack's internal services, and a check that a public port is still free.

The OS picks the ports (bind to port 0); all are held open together so that one call never returns the same port
twice, then released for the children to bind. Another process could take one in between; the child then fails
to bind and the launcher reports it like any other start failure.
"""

from __future__ import annotations

import contextlib
import socket

from splitserve.launcher.errors import PortInUse


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def ensure_free(host: str, port: int, flag: str) -> None:
    """Fails before anything starts if `port` is taken, naming the flag that chooses another."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option servers set (uvicorn, Envoy, gRPC), so a port in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"{host}:{port} is already in use ({exc.strerror}); choose another with {flag}") from exc
