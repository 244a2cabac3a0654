import socket

import pytest

from splitserve.launcher.errors import PortInUse
from splitserve.launcher.ports import ensure_free, free_ports


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(20)
    assert len(set(ports)) == 20
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_ensure_free_names_the_flag_when_the_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"127.0.0.1:{port} is already in use.*--port"):
            ensure_free("127.0.0.1", port, "--port")
    ensure_free("127.0.0.1", port, "--port")  # released: free again
