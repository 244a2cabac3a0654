"""CPU time and memory of a process together with its descendants, from rusage and /proc (Linux only).

A benchmark that compares servers must count every process a side runs: vLLM's engine core and CPU worker are
processes of their own, and splitserve's stack is eight. Standard library only, so vLLM's venv can import it.
"""

from __future__ import annotations

import os
import resource
from typing import Iterable, Mapping


def rusage_cpu_seconds(usage) -> float:
    """User + system seconds of a `resource.getrusage` (or `os.wait4`) result."""
    return usage.ru_utime + usage.ru_stime


def stat_fields(stat_text: str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name, which may itself hold spaces and parentheses.

    Index 0 is the state (field 3 in proc(5)); so ppid is [1], utime [11], stime [12], cutime [13], cstime [14].
    """
    return stat_text.rsplit(")", 1)[1].split()


def stat_cpu_seconds(stat_text: str, ticks_per_s: int) -> float:
    """utime + stime + cutime + cstime of one /proc/<pid>/stat: the process and its children already reaped."""
    fields = stat_fields(stat_text)
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / ticks_per_s


def descendants(root: int, parents: Mapping[int, int]) -> list[int]:
    """Every pid below `root` in the parent map {pid: ppid}, breadth first."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, frontier = [], [root]
    while frontier:
        nxt = [c for pid in frontier for c in sorted(children.get(pid, ()))]
        found.extend(nxt)
        frontier = nxt
    return found


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None  # the process exited between the listing and the read


def parent_map() -> dict[int, int]:
    """{pid: ppid} of every process now visible in /proc."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            text = _read(f"/proc/{name}/stat")
            if text is not None:
                parents[int(name)] = int(stat_fields(text)[1])
    return parents


def tree(root: int) -> list[int]:
    """`root` and its live descendants."""
    return [root, *descendants(root, parent_map())]


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of the given processes, each with its reaped children."""
    ticks = os.sysconf("SC_CLK_TCK")
    texts = (_read(f"/proc/{pid}/stat") for pid in pids)
    return sum(stat_cpu_seconds(text, ticks) for text in texts if text is not None)


def own_tree_cpu_seconds() -> float:
    """CPU seconds of this process (its rusage, with the children it reaped) and of its live descendants."""
    own = rusage_cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
    reaped = rusage_cpu_seconds(resource.getrusage(resource.RUSAGE_CHILDREN))
    return own + reaped + tree_cpu_seconds(descendants(os.getpid(), parent_map()))


def status_rss_bytes(status_text: str) -> int:
    """VmRSS of one /proc/<pid>/status, in bytes (0 for a process with no memory, such as a zombie)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and its descendants, summed (pages they share are counted once per process)."""
    texts = (_read(f"/proc/{pid}/status") for pid in tree(root))
    return sum(status_rss_bytes(text) for text in texts if text is not None)
