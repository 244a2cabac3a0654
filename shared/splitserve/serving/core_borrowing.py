"""Borrowing a neighbour's idle cores for the engine steps that compute prompts.

Why: on a small machine each engine worker is pinned to cores of its own (2 cores: the prefill worker on one, the
decode worker on the other), so a prompt computed while the other worker idles runs on half the machine. At c=1
the first token waited for a one-thread prefill (441 tokens: 152 ms on one thread, 85-89 ms on two with a bounded
spin, vLLM's layout, which runs every step on every core). A step that computes at least `min_prompt_tokens`
prompt tokens runs with one more thread per borrowed core when those cores were idle over the last `window_s`
(busy under `idle_below` of the time, this process's own threads there not counted); every other step keeps the
home cores' threads only, so a neighbour that is working is never slowed by more than one step that began while
it was idle. Where the workers share a core activity board (core_activity.py: the launcher gives them one), the
neighbour's own word decides instead: its cores are borrowed while its engine has no work, and never while it has
some; /proc/stat then only judges cores no engine has marked.

The borrowed threads are torch's own OpenMP threads: the engine thread is pinned to the home cores, the team is
grown once to its full size, and the threads that creates are pinned to the borrowed cores; torch.set_num_threads
then picks how many of them a step uses. Linux only (sched_setaffinity on threads, /proc/stat).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional, Sequence

from prometheus_client import Counter

from splitserve.serving.core_activity import CoreActivityBoard, CoreState

log = logging.getLogger(__name__)

BORROWED_STEPS = Counter("splitserve_engine_core_borrowing_steps_total",
                         "Engine steps that computed enough prompt tokens to borrow idle cores, by outcome: borrowed "
                         "(ran on the borrowed cores too) or neighbour_busy (they were working)", ["outcome"])
for _outcome in ("borrowed", "neighbour_busy"):
    BORROWED_STEPS.labels(_outcome)       # exported as 0 from the start, not from the first such step

PROC_STAT = Path("/proc/stat")


def busy_seconds(cpus: Sequence[int], proc_stat: Path = PROC_STAT) -> float:
    """CPU seconds the given cores spent not idle (user, nice, system, irq, softirq, steal) since boot."""
    wanted = {f"cpu{c}" for c in cpus}
    ticks = 0
    for line in proc_stat.read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            fields = [int(v) for v in rest.split()]
            ticks += sum(fields[:8]) - fields[3] - fields[4]      # all but idle and iowait
    return ticks / os.sysconf("SC_CLK_TCK")


def _own_other_threads_s() -> float:
    """CPU seconds of this process's threads other than the calling one: its borrowed threads, which must not count
    as the neighbour being busy, and its light serving threads, wherever they ran (so the neighbour's share is, if
    anything, read a little low)."""
    return time.process_time() - time.thread_time()


class CoreBorrower:
    """Call it on the engine thread before each step with the prompt tokens the step computes; it sets torch's
    thread count for that step. The first call pins the engine thread and the borrowed threads. `busy()` and
    `idle()` say whether the engine has work (on the board, if there is one)."""

    def __init__(self, home: Sequence[int], borrowed: Sequence[int], min_prompt_tokens: int = 64,
                 idle_below: float = 0.25, window_s: float = 0.1,
                 busy: Callable[[Sequence[int]], float] = busy_seconds,
                 own_other_threads: Callable[[], float] = _own_other_threads_s,
                 clock: Callable[[], float] = time.monotonic, board: Optional[CoreActivityBoard] = None):
        if not home or not borrowed or set(home) & set(borrowed):
            raise ValueError(f"home cores {list(home)} and borrowed cores {list(borrowed)} must be non-empty and apart")
        self.home, self.borrowed = sorted(home), sorted(borrowed)
        self.min_prompt_tokens = min_prompt_tokens
        self.idle_below = idle_below
        self.window_s = window_s
        self._busy, self._own, self._clock = busy, own_other_threads, clock
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=64)   # (time, busy s, own other threads s)
        self._pinned = False
        self.threads = len(self.home)
        self.board = board
        self._marked: Optional[CoreState] = None    # what this worker last wrote for its home cores

    def __call__(self, prompt_tokens: int) -> None:
        if not self._pinned:
            self._pin_threads()
        self.busy()
        wanted = self.threads_for(prompt_tokens)
        if wanted != self.threads:
            self._set_threads(wanted)

    def threads_for(self, prompt_tokens: int) -> int:
        """The threads a step computing `prompt_tokens` prompt tokens runs on (counted when it could borrow).
        A step too small to borrow only keeps the samples recent, at most twice per window: it does not read
        /proc/stat at every decode step."""
        if prompt_tokens < self.min_prompt_tokens:
            if not self._samples or self._clock() - self._samples[-1][0] >= self.window_s / 2:
                self._sample()
            return len(self.home)
        told = self.board.states(self.borrowed) if self.board is not None else None
        if told is CoreState.BUSY or (told is None and self.neighbour_busy_share(self._sample()) >= self.idle_below):
            BORROWED_STEPS.labels("neighbour_busy").inc()
            return len(self.home)
        BORROWED_STEPS.labels("borrowed").inc()
        return len(self.home) + len(self.borrowed)

    def busy(self) -> None:
        """The engine runs a step: its cores are not to be borrowed."""
        self._mark(CoreState.BUSY)

    def idle(self) -> None:
        """The engine has no work: its cores may be borrowed until its next step."""
        self._mark(CoreState.IDLE)

    def _mark(self, state: CoreState) -> None:
        if self.board is not None and self._marked is not state:
            self.board.mark(self.home, state)
            self._marked = state

    def neighbour_busy_share(self, now: tuple[float, float, float]) -> float:
        """The borrowed cores' busy share, less this process's own threads, since the newest sample at least
        window_s old (or the oldest there is)."""
        then = next((s for s in reversed(self._samples) if now[0] - s[0] >= self.window_s), self._samples[0])
        elapsed = now[0] - then[0]
        if elapsed <= 0:
            return 0.0
        theirs = (now[1] - then[1]) - (now[2] - then[2])
        return max(0.0, theirs) / (elapsed * len(self.borrowed))

    def _sample(self) -> tuple[float, float, float]:
        sample = (self._clock(), self._busy(self.borrowed), self._own())
        self._samples.append(sample)
        return sample

    def _set_threads(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.threads = threads

    def _pin_threads(self) -> None:
        """The engine thread to the home cores; torch's team grown to home + borrowed threads, and the threads
        that creates to the borrowed cores, one core each in turn."""
        import torch

        self._pinned = True
        os.sched_setaffinity(0, self.home)   # 0: the calling thread
        before = _thread_ids()
        self._set_threads(len(self.home) + len(self.borrowed))
        a = torch.ones(256, 256)
        for _ in range(4):
            a @ a                              # a parallel region: OpenMP starts the team's threads
        created = sorted(_thread_ids() - before)
        for index, tid in enumerate(created):
            os.sched_setaffinity(tid, {self.borrowed[index % len(self.borrowed)]})
        self._set_threads(len(self.home))
        log.info("core borrowing: engine thread on cores %s; steps of >= %d prompt tokens also use cores %s "
                 "while they are idle (%d threads pinned there)", self.home, self.min_prompt_tokens,
                 self.borrowed, len(created))


def _thread_ids() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def borrowing_for(home: Sequence[int], borrowed: Sequence[int],
                  board_path: Optional[str] = None) -> Optional[CoreBorrower]:
    """A borrower where the platform allows one (Linux: thread affinity and /proc/stat), else None."""
    if not hasattr(os, "sched_setaffinity") or not PROC_STAT.exists():
        return None
    return CoreBorrower(home, borrowed, board=CoreActivityBoard(board_path) if board_path else None)
