"""The real Redis server the local stack runs for the worker registry and load, when no --redis-url is given.

Started with persistence off: the index is rebuilt from live KV events, so a dump on disk would only be stale.

Whoever can write to Redis can announce workers, so this Redis needs a password: the `default` user is off and
one user, `splitserve`, may touch only splitserve's keys (`splitserve:*`) with ordinary read and write commands
(no FLUSHALL, CONFIG, KEYS, DEBUG: nothing in @dangerous) and scripts. The password is new for each stack and reaches the
services in their environment, never on a command line where `ps` shows it; the config file holds only its
SHA-256.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from pathlib import Path
from typing import Optional
from urllib.parse import quote

from splitserve.launcher.errors import ToolNotInstalled

REDIS_USER = "splitserve"
KEY_PATTERN = "splitserve:*"
# Categories, not a command list, so a new use of Redis in splitserve (another hash, a stream of KV events)
# works without an edit here; the key pattern is what keeps it to splitserve's own data. Scripts (the prefix
# index: kv_events/index.py) by EVALSHA, EVAL and SCRIPT LOAD only: a script's commands are checked against the
# same rules, and SCRIPT FLUSH/KILL or FUNCTION stay out.
ALLOWED = "-@all +@read +@write +@connection +@transaction -@dangerous +evalsha +eval +script|load"


def find_redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ToolNotInstalled(
            "redis-server is not installed (not on PATH). Install it (Debian/Ubuntu: `apt-get install "
            "redis-server`, macOS: `brew install redis`), or point the stack at a running Redis with --redis-url")
    return binary


def new_secret() -> str:
    """A random password or cluster token; URL-safe, so it goes into a Redis URL as it is."""
    return secrets.token_urlsafe(32)


def redis_config(password: str) -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()
    return ("user default off\n"
            f"user {REDIS_USER} on #{digest} resetkeys ~{KEY_PATTERN} resetchannels &{KEY_PATTERN} {ALLOWED}\n")


def write_redis_config(path: Path, password: str) -> None:
    """Readable by this user only: the hash is not the password, but it is no one else's business."""
    path = Path(path)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(redis_config(password))


def redis_server_argv(binary: str, host: str, port: int, config_path: Optional[Path] = None) -> list[str]:
    config = [str(config_path)] if config_path is not None else []
    return [binary, *config, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no"]


def redis_url(host: str, port: int, password: Optional[str] = None) -> str:
    credentials = f"{REDIS_USER}:{quote(password, safe='')}@" if password is not None else ""
    return f"redis://{credentials}{host}:{port}/0"
