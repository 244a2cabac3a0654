"""The real Redis server the local stack runs for the prefix index and worker load, when no --redis-url is given.

Started with persistence off: the index is rebuilt from live KV events, so a dump on disk would only be stale.
"""

from __future__ import annotations

import shutil

from splitserve.launcher.errors import ToolNotInstalled


def find_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ToolNotInstalled(
            "redis-server is not installed (not on PATH). Install it (Debian/Ubuntu: `apt-get install "
            "redis-server`, macOS: `brew install redis`), or point the stack at a running Redis with --redis-url")
    return binary


def redis_server_argv(binary: str, host: str, port: int) -> list[str]:
    return [binary, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]


def redis_url(host: str, port: int) -> str:
    return f"redis://{host}:{port}/0"
