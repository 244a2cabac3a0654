"""Keeps the stack's processes running once it has started: a child that exits is started again, bounded.

A restart runs the same command line, so the process comes back on the same ports and every address list handed
out at start (the gateway's tokenizer and worker flags, the workers' kv-store address) stays valid. The delay
before a restart doubles with each restart of that child within the window (a crash loop must not spin the
CPU), and a child restarted `max_restarts` times within `window_s` that exits again is given up on: left stopped,
logged as an error. Every exit and restart is logged with the child's last log lines, and counted in `restarts`.

The supervisor alone starts children again; `Stack` starts it after the stack is ready and stops it before it
stops the children, so a child stopped on purpose is never restarted.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from splitserve.launcher.processes import ChildProcess

log = logging.getLogger(__name__)

POLL_S = 0.2


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # within window_s; 0: never restart
    window_s: float = 300.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def backoff_s(self, recent_restarts: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** recent_restarts)


@dataclass
class _Watch:
    """One child's restart history: restart times within the window, a restart due, or given up."""
    child: ChildProcess
    recent: deque = field(default_factory=deque)
    restart_at: Optional[float] = None
    given_up: bool = False


class Supervisor:
    def __init__(self, children: Sequence[ChildProcess], policy: RestartPolicy,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        self._watches = [_Watch(child) for child in children]
        self.restarts: dict[str, int] = {child.name: 0 for child in children}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def given_up(self) -> list[str]:
        return [w.child.name for w in self._watches if w.given_up]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Returns once no restart can happen any more."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.poll()
            except Exception:  # a bug here must not end supervision for good
                log.exception("supervisor pass failed")

    def poll(self) -> None:
        """One pass: notice children that exited, restart those whose backoff has passed."""
        now = self._clock()
        for watch in self._watches:
            if watch.given_up:
                continue
            if watch.restart_at is None and watch.child.returncode is not None:
                self._exited(watch, now)
            if watch.restart_at is not None and now >= watch.restart_at and not self._stop.is_set():
                self._restart(watch, now)

    def _exited(self, watch: _Watch, now: float) -> None:
        child, policy = watch.child, self.policy
        while watch.recent and watch.recent[0] <= now - policy.window_s:
            watch.recent.popleft()
        what = f"{child.name} (pid {child.pid}) exited with {describe_exit(child.returncode)}"
        tail = f"Last lines of {child.log_path}:\n{child.log_tail()}"
        if len(watch.recent) >= policy.max_restarts:
            watch.given_up = True
            reason = ("restarts are off" if policy.max_restarts == 0 else
                      f"restarted {len(watch.recent)} times within {policy.window_s:.0f} s already")
            log.error("%s; not restarting it (%s), the rest keep running. %s", what, reason, tail)
            return
        delay = policy.backoff_s(len(watch.recent))
        watch.restart_at = now + delay
        log.error("%s; restarting it in %.1f s (restart %d of at most %d within %.0f s). %s", what, delay,
                  len(watch.recent) + 1, policy.max_restarts, policy.window_s, tail)

    def _restart(self, watch: _Watch, now: float) -> None:
        child = watch.child
        child.send_signal(signal.SIGKILL)  # whatever the dead leader started goes with it
        watch.restart_at = None
        watch.recent.append(now)
        self.restarts[child.name] += 1
        try:
            child.start()
        except OSError as exc:  # e.g. the binary vanished: counts as an exit, backoff and bound apply
            log.error("restarting %s failed: %s", child.name, exc)
            self._exited(watch, now)


def describe_exit(returncode: Optional[int]) -> str:
    if returncode is None:
        return "no exit status"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"
