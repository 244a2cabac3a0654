"""Idle memory of `splitserve up`: starts it as a user would, waits for its ready line, lets it settle, and prints
each of its processes' resident memory and the sum, then stops it.

    python loadtest/idle_rss.py                          # the demo model, default settings
    python loadtest/idle_rss.py -- --model /models/m --prefill-workers 0

RSS counts every page a process maps, so libraries shared by several processes (torch's, Python's) count once
per process, as `ps` and vLLM's own figure count them; PSS splits shared pages among their users, so the PSS sum
is what the stack really takes from the machine. Anon is the process's private heap: model weights, the KV
cache pages touched so far, the kv-store's blocks.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ProcessMemory:
    pid: int
    name: str
    rss: int    # bytes
    anon: int
    pss: int


def _status_kib(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def process_tree(root: int) -> list[int]:
    """`root` and everything it started, depth first."""
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(reversed(_children(pid)))
    return pids


def process_name(pid: int) -> str:
    """The service a process runs (`decode --port 41233` -> decode:41233), else its program's name."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "splitserve.services.cli" in argv:
        rest = argv[argv.index("splitserve.services.cli") + 1:]
        port = rest[rest.index("--port") + 1] if "--port" in rest else ""
        return f"{rest[0]}:{port}" if rest else "cli"
    if any(a.endswith("splitserve") for a in argv[:2]) and "up" in argv:
        return "up (launcher)"
    return Path(argv[0]).name.split()[0] if argv[0] else "?"  # redis-server rewrites its title


def measure(root: int) -> list[ProcessMemory]:
    return [ProcessMemory(pid, process_name(pid), _status_kib(pid, "status", "VmRSS"),
                          _status_kib(pid, "status", "RssAnon"), _status_kib(pid, "smaps_rollup", "Pss"))
            for pid in process_tree(root)]


def print_table(rows: list[ProcessMemory]) -> None:
    mib = 2**20
    print(f"{'process':<24} {'pid':>8} {'RSS MiB':>9} {'anon MiB':>9} {'PSS MiB':>9}")
    for r in rows:
        print(f"{r.name:<24} {r.pid:>8} {r.rss / mib:>9.1f} {r.anon / mib:>9.1f} {r.pss / mib:>9.1f}")
    print(f"{'total':<24} {len(rows):>8} {sum(r.rss for r in rows) / mib:>9.1f} "
          f"{sum(r.anon for r in rows) / mib:>9.1f} {sum(r.pss for r in rows) / mib:>9.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settle-s", type=float, default=5.0, help="wait this long after ready before measuring")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up if not ready after this long")
    parser.add_argument("up_args", nargs="*", help="flags for `splitserve up` (after --)")
    args = parser.parse_args(argv)
    command = [str(Path(sys.executable).with_name("splitserve")), "up", "--port", "0", "--grpc-port", "0",
               *args.up_args]
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          start_new_session=True)
    try:
        deadline = time.monotonic() + args.timeout_s
        while True:
            line = up.stdout.readline()
            if line.startswith("splitserve ready:"):
                break
            if not line or time.monotonic() > deadline:
                print(f"splitserve up did not get ready (exit {up.poll()})", file=sys.stderr)
                return 1
        time.sleep(args.settle_s)
        print_table(measure(up.pid))
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
