"""The cores a process may run on, and core lists as Linux writes them ("0-3,8").

An engine sizes its torch threads from these: more OpenMP threads than cores makes threads wait on each other
at every op's barrier. Torch-free: the launcher splits cores with it before any worker starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def parse_cpu_list(text: str) -> list[int]:
    """"0-3,8" -> [0, 1, 2, 3, 8]; ValueError saying what is expected otherwise."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            low = int(first)
            high = int(last) if dash else low
            if low < 0 or high < low:
                raise ValueError
            cpus.update(range(low, high + 1))
    except ValueError:
        raise ValueError(f"{text!r} is not a core list: write e.g. 0-3,8") from None
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 3, 8] -> "0-3,8"."""
    runs: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def allowed_cpus() -> list[int]:
    """The cores this process may be scheduled on (taskset, a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> float | None:
    """Cores' worth of CPU time a cgroup v2 quota allows (a container's CPU limit), None when unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def usable_cores() -> int:
    """How many cores this process can keep busy: its allowed cores, fewer when a CPU quota allows less."""
    cores = len(allowed_cpus())
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit))) if limit else cores


def pin_process(cpus: Iterable[int], pid: int = 0) -> None:
    """Every thread of a process (this one by default) onto `cpus`: sched_setaffinity(pid) moves only one thread,
    and threads that already run (torch's, gRPC's) would stay where they were. Threads started later inherit
    the set."""
    cpus = set(cpus)
    os.sched_setaffinity(pid, cpus)
    for task in Path(f"/proc/{pid or 'self'}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (ProcessLookupError, ValueError):
            continue  # a thread that ended meanwhile
