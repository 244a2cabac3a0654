"""The gateway's HTTP listener: every accepted connection has Nagle off, so a response on a kept-alive connection
(and each streamed chunk) goes out at once instead of waiting for the client's delayed ACK."""

from __future__ import annotations

import asyncio
import socket

import pytest

from splitserve.services.gateway.server import tcp_listener


async def _nodelay_of_accepted_connection(listener: socket.socket) -> int:
    accepted = asyncio.get_running_loop().create_future()

    def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(on_client, sock=listener)
    async with server:
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            return await asyncio.wait_for(accepted, 5)
        finally:
            writer.close()


def test_accepted_connections_have_nagle_off():
    assert asyncio.run(_nodelay_of_accepted_connection(tcp_listener("127.0.0.1", 0))) != 0


def test_a_listener_without_the_tcp_proto_would_leave_nagle_on():
    """Why tcp_listener exists: asyncio skips TCP_NODELAY on socket.create_server's sockets (proto 0)."""
    assert asyncio.run(_nodelay_of_accepted_connection(socket.create_server(("127.0.0.1", 0)))) == 0


def test_a_taken_port_is_an_error_and_leaks_no_socket():
    first = tcp_listener("127.0.0.1", 0)
    with first, pytest.raises(OSError):
        tcp_listener("127.0.0.1", first.getsockname()[1])
