import pytest

from splitserve.launcher import probe
from splitserve.launcher.errors import ToolNotInstalled
from splitserve.launcher.ports import free_ports
from splitserve.launcher.processes import ChildProcess, stop_together
from splitserve.launcher.redis_server import find_redis_server, redis_server_argv, redis_url


def test_missing_redis_server_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolNotInstalled, match="redis-server is not installed.*--redis-url"):
        find_redis_server()


def test_argv_turns_persistence_off():
    argv = redis_server_argv("/usr/bin/redis-server", "127.0.0.1", 6400)
    assert argv[argv.index("--port") + 1] == "6400"
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"


def test_real_redis_starts_answers_and_stops(tmp_path, assert_all_gone):
    import time

    try:
        binary = find_redis_server()
    except ToolNotInstalled as exc:
        pytest.skip(str(exc))
    [port] = free_ports(1)
    url = redis_url("127.0.0.1", port)
    child = ChildProcess("redis", redis_server_argv(binary, "127.0.0.1", port), tmp_path / "redis.log")
    child.start()
    try:
        deadline = time.monotonic() + 10
        while not probe.is_ready("redis", url):
            assert child.alive, child.log_tail()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop_together([child], grace_s=5)
    assert child.returncode == 0
    assert_all_gone([child.pid])


def test_the_kubernetes_redis_grants_what_the_launchers_does():
    """The prefix index's scripts (EVALSHA, EVAL, SCRIPT LOAD) are refused wherever the ACL lacks them."""
    from pathlib import Path

    import yaml

    from splitserve.launcher.redis_server import ALLOWED, KEY_PATTERN

    manifest = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "redis.yaml"
    [statefulset] = [d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "StatefulSet"]
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert args.endswith(f"~{KEY_PATTERN} &{KEY_PATTERN} {ALLOWED}")
