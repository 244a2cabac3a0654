"""One child process of the local stack: started in its own process group with its output in a log file, stopped
with SIGTERM then SIGKILL after a grace period.

A process group per child means a signal reaches whatever the child itself started (e.g. Envoy's wrapper
script execs the binary, a service may fork helpers), and that Ctrl-C in the launcher's terminal reaches only
the launcher, which then stops the children in order.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import deque
from pathlib import Path
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)


class ChildProcess:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Optional[Mapping[str, str]] = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self._popen: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True)
        log.info("started %s (pid %d), log %s", self.name, self._popen.pid, self.log_path)

    @property
    def pid(self) -> Optional[int]:
        return self._popen.pid if self._popen is not None else None

    @property
    def started(self) -> bool:
        return self._popen is not None

    @property
    def returncode(self) -> Optional[int]:
        """The exit status once the process has ended (negative: killed by that signal), else None."""
        return self._popen.poll() if self._popen is not None else None

    @property
    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Signals the whole process group; a group that is already gone is not an error."""
        if self._popen is None:
            return
        try:
            os.killpg(self._popen.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL at once, for fault tests and for children that ignored SIGTERM."""
        self.send_signal(signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait()

    def wait(self, timeout_s: float) -> Optional[int]:
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout=max(timeout_s, 0.0))
        except subprocess.TimeoutExpired:
            return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"ChildProcess({self.name!r}, pid={self.pid}, returncode={self.returncode})"


def stop_together(children: Sequence[ChildProcess], grace_s: float) -> None:
    """SIGTERM to all of `children` at once, then SIGKILL to any still running after `grace_s`.

    Signalled together so one tier's drains overlap instead of adding up. After the leader exits, the group is
    SIGKILLed too, so nothing a child started outlives it.
    """
    started = [c for c in children if c.started]
    for child in started:
        if child.alive:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in started:
        if child.wait(deadline - time.monotonic()) is None:
            log.warning("%s (pid %d) did not stop within %.1f s of SIGTERM; killing it", child.name, child.pid,
                        grace_s)
            child.kill()
        child.send_signal(signal.SIGKILL)
