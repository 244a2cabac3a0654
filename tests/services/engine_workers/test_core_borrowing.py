"""Borrowing a neighbour's idle cores for prompt steps: the decision (fake clock and counters, and the shared
activity board), the real pinning of torch's threads (a subprocess), and /proc/stat's reading."""

import json
import os
import subprocess
import sys

import pytest

from splitserve.serving.core_activity import CoreActivityBoard, CoreState
from splitserve.serving.core_borrowing import CoreBorrower, busy_seconds


class _Clock:
    def __init__(self):
        self.now, self.busy, self.own = 0.0, 0.0, 0.0

    def borrower(self, **kwargs) -> CoreBorrower:
        return CoreBorrower([1], [0], busy=lambda cpus: self.busy, own_other_threads=lambda: self.own,
                            clock=lambda: self.now, **kwargs)

    def advance(self, seconds: float, busy: float = 0.0, own: float = 0.0):
        self.now += seconds
        self.busy += busy
        self.own += own


def test_a_prompt_step_borrows_an_idle_neighbour_and_leaves_a_busy_one_alone():
    clock = _Clock()
    borrower = clock.borrower(min_prompt_tokens=64, idle_below=0.25, window_s=0.1)
    assert borrower.threads_for(500) == 2                   # first step: nothing seen busy
    clock.advance(0.2, busy=0.02)
    assert borrower.threads_for(500) == 2                   # 10 % busy
    clock.advance(0.2, busy=0.1)
    assert borrower.threads_for(500) == 1                   # 50 % busy: the neighbour works
    clock.advance(0.2, busy=0.2)
    assert borrower.threads_for(63) == 1                    # a decode step never borrows


def test_this_processs_own_threads_on_the_borrowed_core_do_not_count_as_the_neighbour():
    clock = _Clock()
    borrower = clock.borrower()
    borrower.threads_for(500)
    clock.advance(0.2, busy=0.18, own=0.17)                 # the core was busy with our own borrowed thread
    assert borrower.threads_for(500) == 2
    clock.advance(0.2, busy=0.18, own=0.0)                  # the same busy time, none of it ours
    assert borrower.threads_for(500) == 1


def test_the_share_is_taken_over_at_least_the_window():
    """Steps 10 ms apart: the share spans the newest sample at least window_s old, not the last 10 ms."""
    clock = _Clock()
    borrower = clock.borrower(window_s=0.1)
    borrower.threads_for(0)
    clock.advance(0.1, busy=0.09)                           # 90 % busy for 100 ms
    borrower.threads_for(0)
    clock.advance(0.01)                                     # then idle for 10 ms
    assert borrower.threads_for(500) == 1                   # (0.09) / 0.11 s: still busy


def test_decode_steps_read_the_counters_at_most_twice_per_window():
    clock = _Clock()
    reads = []
    borrower = CoreBorrower([1], [0], busy=lambda cpus: reads.append(clock.now) or 0.0, own_other_threads=lambda: 0.0,
                            clock=lambda: clock.now, window_s=0.1)
    for _ in range(10):                                     # decode steps 10 ms apart
        borrower.threads_for(1)
        clock.advance(0.01)
    assert reads == pytest.approx([0.0, 0.05])
    borrower.threads_for(500)                               # a prompt step always takes a fresh sample
    assert len(reads) == 3


def test_the_board_says_what_each_workers_cores_are_doing_across_processes(tmp_path):
    path = str(tmp_path / "core-activity")
    prefill, decode = CoreActivityBoard(path), CoreActivityBoard(path)     # two openers, as two workers
    assert decode.states([0]) is None                                      # nobody wrote core 0 yet
    prefill.mark([0], CoreState.BUSY)
    assert decode.state(0) is CoreState.BUSY and decode.states([0]) is CoreState.BUSY
    prefill.mark([0], CoreState.IDLE)
    assert decode.states([0]) is CoreState.IDLE
    decode.mark([1, 2], CoreState.IDLE)
    prefill.mark([3], CoreState.BUSY)
    assert prefill.states([1, 2]) is CoreState.IDLE
    assert prefill.states([1, 2, 3]) is CoreState.BUSY                     # any busy core: busy
    assert prefill.states([1, 2, 4]) is None                               # one never marked: unknown
    out = subprocess.run([sys.executable, "-c", "import sys; from splitserve.serving.core_activity import "
                          "CoreActivityBoard; print(int(CoreActivityBoard(sys.argv[1]).state(3)))", path],
                         check=True, capture_output=True, text=True, timeout=60)
    assert int(out.stdout) == CoreState.BUSY                               # another process reads the same slot
    with pytest.raises(ValueError, match="core id"):
        prefill.mark([-1], CoreState.IDLE)


def test_with_a_board_the_neighbours_own_word_decides_and_the_window_only_judges_unmarked_cores(tmp_path):
    """At c=1 the prefill worker's last /proc/stat sample was a request ago, so its window spanned the decode of the
    previous request and read the idle decode worker as busy; the board says it has no work."""
    path = str(tmp_path / "core-activity")
    clock = _Clock()
    prefill = CoreBorrower([0], [1], busy=lambda cpus: clock.busy, own_other_threads=lambda: 0.0,
                           clock=lambda: clock.now, board=CoreActivityBoard(path))
    decode = CoreBorrower([1], [0], busy=lambda cpus: 0.0, own_other_threads=lambda: 0.0, clock=lambda: clock.now,
                          board=CoreActivityBoard(path))
    prefill.threads_for(500)
    clock.advance(1.0, busy=0.95)                           # the decode worker decoded for most of the last second
    assert prefill.threads_for(500) == 1                    # no word from it yet: the busy window decides
    decode.busy()                                           # a decode step runs (the engine calls the borrower)...
    clock.advance(1.0, busy=0.0)
    assert prefill.threads_for(500) == 1                    # ...busy by its word, however idle the counters
    decode.idle()                                           # it ran out of work
    assert prefill.threads_for(500) == 2                    # borrowed at once, the busy window notwithstanding
    assert decode.board.state(0) is CoreState.UNKNOWN       # threads_for() alone marks nothing
    prefill.busy()                                          # a step: the prefill worker's own core is busy now
    assert decode.board.state(0) is CoreState.BUSY and decode.threads_for(500) == 1
    prefill.idle()
    assert decode.threads_for(500) == 2


def test_home_and_borrowed_cores_must_be_given_and_apart():
    with pytest.raises(ValueError, match="apart"):
        CoreBorrower([0], [0])
    with pytest.raises(ValueError, match="apart"):
        CoreBorrower([0], [])


def test_busy_seconds_reads_the_cores_non_idle_ticks(tmp_path):
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text(f"cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 {hz} 0 {hz} 500 70 0 0 0 0 0\ncpu1 0 0 {2 * hz} 9 9 0 0 0 0 0\n")
    assert busy_seconds([0], stat) == pytest.approx(2.0)
    assert busy_seconds([0, 1], stat) == pytest.approx(4.0)
    assert busy_seconds([0]) > 0                            # the real /proc/stat


_PROBE = """
import json, os, sys, threading, torch
from splitserve.serving.core_borrowing import CoreBorrower
home, borrowed = json.loads(sys.argv[1])
out = {}
def engine_thread():
    torch.set_num_threads(1)
    borrower = CoreBorrower([home], [borrowed], busy=lambda cpus: 0.0)
    borrower(1000)
    out["prompt_threads"] = torch.get_num_threads()
    out["engine_affinity"] = sorted(os.sched_getaffinity(0))
    a = torch.randn(512, 512)
    for _ in range(20):
        a = torch.tanh(a @ a)
    borrower(1)
    out["decode_threads"] = torch.get_num_threads()
    out["task_affinities"] = sorted(sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task"))
thread = threading.Thread(target=engine_thread)
thread.start(); thread.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_the_engine_thread_stays_home_and_the_borrowed_thread_runs_on_the_borrowed_core():
    home, borrowed = sorted(os.sched_getaffinity(0))[:2]
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([home, borrowed])], check=True,
                         capture_output=True, text=True, timeout=120)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["prompt_threads"] == 2 and seen["decode_threads"] == 1
    assert seen["engine_affinity"] == [home]
    assert [borrowed] in seen["task_affinities"]            # torch's second thread, pinned there
