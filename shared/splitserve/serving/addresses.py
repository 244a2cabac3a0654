"""host:port strings, and the address a worker announces: where peers in other containers or pods reach it.

A worker bound to a wildcard (0.0.0.0, ::) listens on every interface, but "0.0.0.0:port" names no peer-reachable
place, and replicas started from one template (`docker compose up --scale`, a Deployment) cannot each be handed
their own address. So without --advertise-address a wildcard-bound worker announces the address its host name
resolves to: the container's IP (Docker writes it into /etc/hosts) or the pod's (Kubernetes does the same).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Callable, Optional

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class AdvertiseAddressError(ValueError):
    """This host's name resolves to no address another machine could connect to."""


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def own_ip(hostname: Optional[str] = None) -> str:
    """The first non-loopback address this host's name resolves to (IPv4 before IPv6, as getaddrinfo orders)."""
    name = hostname or socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AdvertiseAddressError(f"host name {name!r} does not resolve ({exc}); set --advertise-address") from exc
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
            return str(ip)
    raise AdvertiseAddressError(f"host name {name!r} resolves only to loopback or link-local addresses; set "
                                f"--advertise-address to where other hosts reach this worker")


def advertised_address(advertise_address: Optional[str], host: str, port: int,
                       resolve: Callable[[], str] = own_ip) -> str:
    """--advertise-address when given; else host:port, with a wildcard host replaced by this host's own IP."""
    if advertise_address:
        return advertise_address
    return host_port(resolve() if host in WILDCARD_HOSTS else host, port)
