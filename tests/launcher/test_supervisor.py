"""The supervisor's restart policy, on real short-lived processes and an injected clock."""

from __future__ import annotations

import sys

import pytest

from splitserve.launcher.processes import ChildProcess
from splitserve.launcher.supervisor import RestartPolicy, Supervisor


def _child(tmp_path, code: str, name: str = "flaky") -> ChildProcess:
    return ChildProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _exited(child: ChildProcess) -> None:
    assert child.wait(10) is not None


def test_a_process_that_crashes_at_once_is_given_up_after_max_restarts(tmp_path, caplog):
    child = _child(tmp_path, "import sys; print('cannot start'); sys.exit(3)")
    clock = Clock()
    supervisor = Supervisor([child], RestartPolicy(max_restarts=3, window_s=60, first_backoff_s=1, max_backoff_s=3),
                            clock=clock)
    child.start()
    delays = []
    with caplog.at_level("ERROR", logger="splitserve.launcher.supervisor"):
        for _ in range(10):
            _exited(child)
            supervisor.poll()  # notices the exit, schedules (or refuses) a restart
            if supervisor.given_up:
                break
            before = child.pid
            step = 0.0
            while child.pid == before:  # not restarted before its backoff
                clock.now += 0.25
                step += 0.25
                supervisor.poll()
            delays.append(step)
    assert supervisor.given_up == ["flaky"]
    assert supervisor.restarts == {"flaky": 3}
    assert delays == [1.0, 2.0, 3.0]  # doubling, capped at max_backoff_s
    assert "flaky (pid" in caplog.text and "exited with code 3; restarting it in 1.0 s" in caplog.text
    assert "not restarting it (restarted 3 times within 60 s already)" in caplog.text
    assert "cannot start" in caplog.text  # the tail of its log
    clock.now += 100
    supervisor.poll()
    assert not child.alive and supervisor.restarts == {"flaky": 3}


def test_restarts_older_than_the_window_no_longer_count(tmp_path):
    child = _child(tmp_path, "pass")
    clock = Clock()
    supervisor = Supervisor([child], RestartPolicy(max_restarts=1, window_s=10, first_backoff_s=1), clock=clock)
    child.start()
    for _ in range(3):  # one crash every 20 s: each is the only restart in its window
        _exited(child)
        supervisor.poll()
        clock.now += 1
        supervisor.poll()
        assert child.started and not supervisor.given_up
        clock.now += 19
    assert supervisor.restarts == {"flaky": 3}


def test_stopped_supervisor_restarts_nothing(tmp_path):
    child = _child(tmp_path, "pass")
    supervisor = Supervisor([child], RestartPolicy(first_backoff_s=0))
    supervisor.start()
    supervisor.stop()
    child.start()
    _exited(child)
    supervisor.poll()
    assert supervisor.restarts == {"flaky": 0}


@pytest.mark.parametrize("recent, expected", [(0, 0.5), (1, 1.0), (4, 8.0), (10, 30.0)])
def test_backoff_doubles_up_to_its_cap(recent, expected):
    assert RestartPolicy().backoff_s(recent) == expected
