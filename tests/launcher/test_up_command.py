"""`splitserve up` as a user runs it: one ready line on stdout, clean stop on SIGTERM, clear failures."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator


def _pids(stderr: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"started \S+ \(pid (\d+)\)", stderr)]


@contextlib.contextmanager
def _up_with_fakes(fake_command, *args, env=None) -> Iterator[subprocess.Popen]:
    """`splitserve up` exactly as the command runs it, but with stand-in services; killed if still running at
    the end of the body."""
    code = ("import sys; from splitserve.launcher.up import main; "
            f"sys.exit(main(sys.argv[1:], service_command={fake_command!r}))")
    up = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, **(env or {})})
    try:
        yield up
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def _sigterm(up: subprocess.Popen) -> tuple[str, str]:
    """Its stdout and stderr once it has exited on SIGTERM."""
    up.send_signal(signal.SIGTERM)
    return up.communicate(timeout=30)


def test_ready_line_then_a_clean_stop_on_sigterm(tmp_path, fake_command, assert_all_gone):
    with _up_with_fakes(fake_command, "--model", "/models/m", "--port", "0", "--grpc-port", "0", "--grace-s", "1",
                        "--log-dir", str(tmp_path)) as up:
        ready = up.stdout.readline()
        assert re.fullmatch(r"splitserve ready: http://127\.0\.0\.1:\d+/v1\n", ready), (ready, up.stderr.read())
        base_url = ready.split(": ", 1)[1].strip()
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as reply:
            assert reply.status == 200
        stdout, stderr = _sigterm(up)
    assert up.returncode == 0, stderr
    assert stdout == ""  # the ready line was the only one
    assert f"logs in {tmp_path}" in stderr
    pids = _pids(stderr)
    assert len(pids) == 8  # redis, 2 tokenizers, kv-store, prefill, decode, gateway, envoy
    assert_all_gone(pids)


def test_sigterm_during_start_stops_what_was_started(tmp_path, fake_command, assert_all_gone):
    with _up_with_fakes(fake_command, "--model", "/m", "--port", "0", "--grpc-port", "0", "--grace-s", "1",
                        "--log-dir", str(tmp_path), env={"FAKE_UNHEALTHY": "kv-store"}) as up:
        # kv-store runs but never becomes healthy, so the launcher is still starting when the signal comes.
        kv_store_log = tmp_path / "kv-store.log"
        deadline = time.monotonic() + 30
        while not (kv_store_log.exists() and kv_store_log.read_text().strip()):
            assert up.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        stdout, stderr = _sigterm(up)
    assert up.returncode == 0, stderr
    assert "splitserve ready" not in stdout
    assert "SIGTERM received, stopping the stack" in stderr
    pids = _pids(stderr)
    assert len(pids) == 6  # redis, 2 tokenizers, kv-store, prefill, decode: the gateway never started
    assert_all_gone(pids)


def test_a_bad_model_path_fails_fast_and_leaves_nothing_running(tmp_path, assert_all_gone):
    """The real services this time: each one that loads the model refuses an empty folder."""
    model = tmp_path / "not-a-checkpoint"
    model.mkdir()
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "splitserve.services.cli", "up", "--model", str(model),
                             "--port", "0", "--grpc-port", "0", "--grace-s", "2", "--log-dir", str(tmp_path / "logs"),
                             "--startup-timeout-s", "120"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 120  # failed on the exit, not the timeout
    assert result.stdout == ""
    assert re.search(r"splitserve up: (tokenizer-\d|prefill-0|decode-0) exited with code \d+ while the stack was "
                     r"starting\. Last lines of .*\.log:", result.stderr), result.stderr
    assert str(model) in result.stderr.split("while the stack was starting", 1)[1]  # the tail names the model
    pids = _pids(result.stderr)
    assert len(pids) >= 6  # redis, 2 tokenizers, kv-store, prefill, decode
    assert_all_gone(pids)


def test_missing_redis_server_is_reported_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "splitserve.services.cli", "up", "--model", "/m", "--port", "0",
                             "--grpc-port", "0", "--log-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PATH": str(tmp_path)})
    assert result.returncode == 1
    assert "splitserve up: redis-server is not installed" in result.stderr
    assert _pids(result.stderr) == []


def test_a_taken_public_port_is_reported_with_the_flag_to_change(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "splitserve.services.cli", "up", "--model", "/m", "--port",
                                 str(port), "--grpc-port", "0", "--log-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in result.stderr and "--port" in result.stderr
    assert _pids(result.stderr) == []
