"""CPU time of a process together with its descendants, from rusage and /proc (Linux only).

A benchmark that compares engines must count every process a side runs: vLLM's engine core and CPU worker are
processes of their own. The tree itself is loadtest/idle_rss.py's (which also reads memory). Standard library
only, so vLLM's venv can import it.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtest"))
from idle_rss import process_tree  # noqa: E402


def rusage_cpu_seconds(usage) -> float:
    """User + system seconds of a `resource.getrusage` (or `os.wait4`) result."""
    return usage.ru_utime + usage.ru_stime


def stat_cpu_seconds(stat_text: str, ticks_per_s: int) -> float:
    """utime + stime + cutime + cstime of one /proc/<pid>/stat: the process and its children already reaped.

    The command name in parentheses may itself hold spaces and parentheses, so fields count from its end."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks_per_s


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of the given processes, each with its reaped children."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            total += stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text(), ticks)
        except OSError:
            pass  # exited since the tree was read
    return total


def own_tree_cpu_seconds() -> float:
    """CPU seconds of this process (its rusage, with the children it reaped) and of its live descendants."""
    own = rusage_cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
    reaped = rusage_cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN))
    return own + reaped + tree_cpu_seconds(process_tree(os.getpid())[1:])
