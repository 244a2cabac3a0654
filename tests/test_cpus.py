"""Core lists as Linux writes them, and how many cores a process can use."""

import os

import pytest

from splitserve.cpus import allowed_cpus, cgroup_cpu_limit, format_cpu_list, parse_cpu_list, usable_cores


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
