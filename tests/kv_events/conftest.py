"""A real redis-server with the launcher's ACL (so the index's scripts are proved to run under it)."""

from __future__ import annotations

import time

import pytest

from splitserve.launcher import probe
from splitserve.launcher.ports import free_ports
from splitserve.launcher.processes import ChildProcess, stop_together
from splitserve.launcher.redis_server import (find_redis_server, new_secret, redis_server_argv, redis_url,
                                              write_redis_config)


class RedisServer:
    def __init__(self, tmp_path):
        self.password = new_secret()
        [self.port] = free_ports(1)
        self.url = redis_url("127.0.0.1", self.port, self.password)
        self.config = tmp_path / "redis.conf"
        write_redis_config(self.config, self.password)
        self.log = tmp_path / "redis.log"
        self.child = None

    def start(self) -> None:
        self.child = ChildProcess("redis", redis_server_argv(find_redis_server(), "127.0.0.1", self.port,
                                                             self.config), self.log)
        self.child.start()
        deadline = time.monotonic() + 10
        while not probe.is_ready("redis", self.url):
            assert time.monotonic() < deadline, self.child.log_tail()
            time.sleep(0.05)

    def stop(self) -> None:
        if self.child is not None:
            stop_together([self.child], grace_s=5)
            self.child = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
