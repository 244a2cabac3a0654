import signal
import sys
import time

from splitserve.launcher.processes import ChildProcess, stop_together


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_output_goes_to_the_log_and_the_tail_is_readable(tmp_path):
    child = ChildProcess("talker", _python("for i in range(100): print('line', i)"), tmp_path / "talker.log")
    child.start()
    assert child.wait(10) == 0
    assert child.returncode == 0 and not child.alive
    assert child.log_tail(3).splitlines() == ["line 97", "line 98", "line 99"]


def test_each_child_has_its_own_process_group(tmp_path):
    import os

    child = ChildProcess("sleeper", _python("import time; time.sleep(30)"), tmp_path / "s.log")
    child.start()
    try:
        assert os.getpgid(child.pid) == child.pid != os.getpgid(0)
    finally:
        stop_together([child], grace_s=5)


def test_stop_sends_sigterm_and_the_child_exits_cleanly(tmp_path):
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('draining', flush=True), sys.exit(0)))\n"
            "print('up', flush=True)\n"
            "time.sleep(30)\n")
    child = ChildProcess("polite", _python(code), tmp_path / "p.log")
    child.start()
    _wait_for_line(child, "up")
    stop_together([child], grace_s=5)
    assert child.returncode == 0
    assert "draining" in child.log_tail()


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(tmp_path, assert_all_gone):
    code = ("import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            # A grandchild in the same group must not outlive the stop either.
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
            "print('up', flush=True)\n"
            "time.sleep(60)\n")
    child = ChildProcess("stubborn", _python(code), tmp_path / "s.log")
    child.start()
    _wait_for_line(child, "up")
    started = time.monotonic()
    stop_together([child], grace_s=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert child.returncode == -signal.SIGKILL
    assert_all_gone([child.pid])


def test_stopping_never_started_or_exited_children_is_harmless(tmp_path):
    never = ChildProcess("never", _python("pass"), tmp_path / "n.log")
    done = ChildProcess("done", _python("pass"), tmp_path / "d.log")
    done.start()
    done.wait(10)
    stop_together([never, done], grace_s=1)
    assert never.returncode is None and done.returncode == 0
    assert never.log_tail() == ""


def _wait_for_line(child: ChildProcess, line: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while line not in child.log_tail().splitlines():
        assert child.alive, child.log_tail()
        assert time.monotonic() < deadline, f"{child.name} never printed {line!r}"
        time.sleep(0.05)
