import socket

import pytest

from splitserve.launcher.errors import PortInUse
from splitserve.launcher.ports import LOWEST_CHOSEN_PORT, ensure_free, free_ports, ports_outside_ephemeral_range


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(20)
    assert len(set(ports)) == 20
    for port in ports[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_ports_lie_below_the_ephemeral_range_where_outgoing_connections_take_theirs(tmp_path):
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("32768\t60999\n")
    candidates = ports_outside_ephemeral_range(range_file)
    assert candidates == range(LOWEST_CHOSEN_PORT, 32768)
    ports = free_ports(12, candidates=candidates)
    assert len(set(ports)) == 12 and all(port in candidates for port in ports)


def test_a_taken_candidate_is_skipped_and_the_os_picks_when_none_is_left():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [other] = free_ports(1, candidates=range(port, port + 1))
        assert other != port


def test_an_unreadable_or_empty_range_leaves_the_choice_to_the_os(tmp_path):
    assert ports_outside_ephemeral_range(tmp_path / "missing") is None
    (tmp_path / "low").write_text("1024 60999\n")
    assert ports_outside_ephemeral_range(tmp_path / "low") is None
    assert len(set(free_ports(3, candidates=range(0)))) == 3  # nothing to choose from: bind(0)


def test_ensure_free_names_the_flag_when_the_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"127.0.0.1:{port} is already in use.*--port"):
            ensure_free("127.0.0.1", port, "--port")
    ensure_free("127.0.0.1", port, "--port")  # released: free again
