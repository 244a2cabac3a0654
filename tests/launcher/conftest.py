"""Fixtures for the launcher tests: stand-in services, and a check that no process outlives its stack."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

FAKE_SERVICES = Path(__file__).with_name("fake_services.py")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def fake_command() -> list[str]:
    """Replaces `python -m splitserve.services.cli`: the launcher runs `<this> <role> <flags>`."""
    return [sys.executable, str(FAKE_SERVICES)]


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start at state: state, ppid, pgrp.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry))
    return members


@pytest.fixture
def assert_all_gone():
    """assert_all_gone(pids): every process group led by one of `pids` is empty (waits up to 5 s)."""

    def check(pids):
        pids = [p for p in pids if p is not None]
        assert pids, "no pids to check"
        deadline = time.monotonic() + 5
        while True:
            left = {pid: group_members(pid) for pid in pids if group_members(pid)}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not left, f"processes outlived the stack: {left}"

    return check
