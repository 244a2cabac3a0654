"""Core lists as Linux writes them, and how many cores a process can use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitserve.cpus import (allowed_cpus, cgroup_cpu_limit, format_cpu_list, parse_cpu_list, pin_process,
                             usable_cores)


def test_core_lists_round_trip():
    assert parse_cpu_list("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_cpu_list(" 5 , 1-2,2") == [1, 2, 5]
    assert format_cpu_list([8, 0, 1, 2, 3]) == "0-3,8"
    assert format_cpu_list([1, 3, 5]) == "1,3,5"


@pytest.mark.parametrize("bad", ["", "a", "3-1", "-1", "0-", "1,,2"])
def test_a_bad_core_list_says_what_to_write(bad):
    with pytest.raises(ValueError, match="not a core list: write e.g. 0-3,8"):
        parse_cpu_list(bad)


def test_a_cgroup_quota_limits_the_cores(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert cgroup_cpu_limit(cpu_max) is None
    cpu_max.write_text("250000 100000\n")
    assert cgroup_cpu_limit(cpu_max) == 2.5
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_usable_cores_are_the_allowed_ones_at_most():
    assert allowed_cpus() == sorted(os.sched_getaffinity(0))
    assert 1 <= usable_cores() <= len(allowed_cpus())


def test_pinning_another_process_moves_every_one_of_its_threads():
    """As a benchmark pins the gateway it started: threads that already run move too, not only the first."""
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); print(1, flush=True)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()                       # its second thread runs
        core = allowed_cpus()[-1]
        pin_process([core], pid=child.pid)
        tasks = list(Path(f"/proc/{child.pid}/task").iterdir())
        assert len(tasks) == 2
        assert all(os.sched_getaffinity(int(task.name)) == {core} for task in tasks)
    finally:
        child.kill()
        child.wait()
