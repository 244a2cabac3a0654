"""`Stack` end to end with stand-in services (fake_services.py) and the real Redis and Envoy."""

import json
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from splitserve.launcher import probe
from splitserve.launcher.errors import StackStartError
from splitserve.launcher.stack import Stack


def _argv_of(stack, name):
    """The flags a stand-in service was started with (it prints them as its first log line)."""
    return json.loads((stack.log_dir / f"{name}.log").read_text().splitlines()[0])["argv"]


@pytest.fixture
def stack(tmp_path, fake_command):
    with Stack(model="/models/m", prefill_workers=2, grace_s=1, log_dir=tmp_path,
               service_command=fake_command) as stack:
        yield stack


def test_the_stack_is_ready_through_envoy(stack):
    with urllib.request.urlopen(stack.http_url + "/health", timeout=5) as reply:
        assert reply.status == 200
    probe.check_grpc(stack.grpc_address)
    probe.check_redis(stack.redis_url)
    assert stack.base_url.endswith("/v1")
    assert [c.name for c in stack.children] == ["redis", "tokenizer-0", "tokenizer-1", "kv-store", "prefill-0",
                                                "prefill-1", "decode-0", "gateway", "envoy"]
    assert all(c.alive for c in stack.children)
    assert len(stack.addresses["prefill"]) == 2 and len(stack.addresses["decode"]) == 1
    for role in ("tokenizer", "kv-store", "prefill", "decode"):
        for address in stack.addresses[role]:
            probe.check_grpc(address)
    gateway_argv = _argv_of(stack, "gateway")
    assert gateway_argv[gateway_argv.index("--prefill-addresses") + 1] == ",".join(stack.addresses["prefill"])
    assert (stack.log_dir / "envoy.yaml").is_file()


def _wait(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_the_stacks_redis_refuses_clients_without_its_password(stack):
    url = urlsplit(stack.redis_url)
    password = url.password
    assert url.username == "splitserve" and len(password) >= 32
    without = urlunsplit(url._replace(netloc=url.netloc.rsplit("@", 1)[1]))
    with pytest.raises(probe.NotReady, match="authenticated|NOAUTH") as refused:
        probe.check_redis(without)
    wrong = urlunsplit(url._replace(netloc="splitserve:guess@" + url.netloc.rsplit("@", 1)[1]))
    with pytest.raises(probe.NotReady, match="invalid username-password"):
        probe.check_redis(wrong)
    assert password not in str(refused.value)
    client = redis.Redis.from_url(stack.redis_url)
    try:  # the splitserve user keeps to splitserve's keys and harmless commands
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set("someone-elses-key", "x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()
    finally:
        client.close()
    config = stack.log_dir / "redis.conf"
    assert config.stat().st_mode & 0o777 == 0o600 and password not in config.read_text()
    # The secrets reach the services in their environment; command lines (`ps`) show neither.
    decode = stack.process("decode", 0)
    environ = dict(entry.split("=", 1) for entry in
                   Path(f"/proc/{decode.pid}/environ").read_bytes().decode().split("\0") if "=" in entry)
    assert environ["SPLITSERVE_REDIS_URL"] == stack.redis_url and len(environ["SPLITSERVE_CLUSTER_TOKEN"]) >= 32
    for child in stack.children:
        cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes().decode()
        assert password not in cmdline and environ["SPLITSERVE_CLUSTER_TOKEN"] not in cmdline


def test_a_dead_process_is_restarted_on_its_own_port(stack, caplog):
    victim = stack.process("decode", 0)
    old_pid = victim.pid
    with caplog.at_level("ERROR", logger="splitserve.launcher.supervisor"):
        victim.kill()
        _wait(lambda: victim.alive and victim.pid != old_pid)
    assert f"decode-0 (pid {old_pid}) exited with signal SIGKILL; restarting it" in caplog.text
    _wait(lambda: probe.is_ready("grpc", stack.addresses["decode"][0]))  # the address the gateway was given
    assert stack.restarts == {**{c.name: 0 for c in stack.children}, "decode-0": 1}
    assert all(c.alive for c in stack.children)
    probe.check_http(stack.http_url + "/health")


def test_without_restarts_a_dead_process_stays_down_and_the_rest_keep_running(tmp_path, fake_command, caplog):
    with Stack(model="/models/m", grace_s=1, log_dir=tmp_path, service_command=fake_command,
               max_restarts=0) as stack:
        victim = stack.process("decode", 0)
        with caplog.at_level("ERROR", logger="splitserve.launcher.supervisor"):
            victim.kill()
            _wait(lambda: "decode-0" in stack.supervisor.given_up)
        assert "decode-0" in caplog.text and "not restarting it (restarts are off)" in caplog.text
        time.sleep(0.5)
        assert not victim.alive and stack.restarts["decode-0"] == 0
        assert all(c.alive for c in stack.children if c is not victim)
        probe.check_http(stack.http_url + "/health")


def test_stop_ends_every_process_group(tmp_path, fake_command, assert_all_gone):
    stack = Stack(model="/models/m", grace_s=1, log_dir=tmp_path, service_command=fake_command).start()
    pids = [c.pid for c in stack.children]
    stack.stop()
    stack.stop()  # twice is harmless
    assert all(c.returncode == 0 for c in stack.children), stack.children  # SIGTERM, not SIGKILL
    assert_all_gone(pids)
    assert "SIGTERM, exiting" in (tmp_path / "gateway.log").read_text()


def test_a_crashing_service_stops_the_start_and_everything_started(tmp_path, fake_command, assert_all_gone):
    stack = Stack(model="/models/m", grace_s=1, log_dir=tmp_path, service_command=fake_command,
                  extra_args={"decode": ["--fake-crash"]})
    with pytest.raises(StackStartError, match=r"decode-0 exited with code 3 while the stack was starting") as err:
        stack.start()
    assert "cannot load the model (fake crash)" in str(err.value)  # the tail of its log
    assert "gateway" not in [c.name for c in stack.children]  # never got that far
    assert all(not c.alive for c in stack.children)
    assert_all_gone([c.pid for c in stack.children])


def test_a_service_that_never_gets_healthy_times_out_with_the_reason(tmp_path, fake_command, assert_all_gone):
    stack = Stack(model="/models/m", grace_s=1, log_dir=tmp_path, service_command=fake_command,
                  startup_timeout_s=4, extra_args={"kv-store": ["--fake-unhealthy"]})
    with pytest.raises(StackStartError, match=r"not ready after 4 s: kv-store \(gRPC health of .*NOT_SERVING\)"):
        stack.start()
    assert_all_gone([c.pid for c in stack.children])


def test_without_envoy_the_gateway_serves_the_public_port(tmp_path, fake_command):
    with Stack(model="/models/m", envoy=False, grace_s=1, log_dir=tmp_path, service_command=fake_command) as stack:
        assert "envoy" not in [c.name for c in stack.children]
        argv = _argv_of(stack, "gateway")
        assert stack.http_url.endswith(":" + argv[argv.index("--port") + 1])
        probe.check_http(stack.http_url + "/health")
        probe.check_grpc(stack.grpc_address)


def test_process_names_what_exists(tmp_path):
    stack = Stack(model="m", log_dir=tmp_path)
    with pytest.raises(KeyError, match="no decode process #0"):
        stack.process("decode")
