"""Free TCP ports for the stack's internal services, and a check that a public port is still free.

Ports are chosen below the kernel's ephemeral range (where it picks the local port of every outgoing
connection), so that the connections the stack's own processes open while it starts (Redis, gRPC, the KV event
publishers) cannot take one between the choice and the child's bind: with ports from bind(0), which come from
that range, CI saw a kv-store fail to bind this way. Each is checked by binding it; all are held open together
so that one call never returns the same port twice, then released for the children to bind. Another process
could still bind one explicitly in between; the child then fails to bind and the launcher reports it like any
other start failure. Where the range cannot be read or leaves no room below it, the OS picks (bind to port 0).
"""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path
from typing import Optional

from splitserve.launcher.errors import PortInUse

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_CHOSEN_PORT = 10000  # below: well-known and registered services (Redis 6379, Prometheus 9090, ...)
_CANDIDATES_PER_PORT = 50


def ports_outside_ephemeral_range(range_file: Path = EPHEMERAL_RANGE_FILE) -> Optional[range]:
    """The ports from LOWEST_CHOSEN_PORT up to the kernel's ephemeral range; None if unknown or empty."""
    try:
        first_ephemeral = int(range_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(LOWEST_CHOSEN_PORT, first_ephemeral) if first_ephemeral > LOWEST_CHOSEN_PORT else None


def free_ports(count: int, host: str = "127.0.0.1", candidates: Optional[range] = None) -> list[int]:
    candidates = candidates if candidates is not None else ports_outside_ephemeral_range()
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        tries = random.sample(candidates, min(len(candidates), count * _CANDIDATES_PER_PORT)) if candidates else []
        for port in tries:
            if len(ports) == count:
                break
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind((host, port))
            except OSError:
                continue  # taken: try the next candidate
            ports.append(port)
        while len(ports) < count:  # no candidates left (or none known): the OS picks
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
