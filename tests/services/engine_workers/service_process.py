"""Starts one splitserve service as a real process and waits until its gRPC health check answers."""

from __future__ import annotations

import os
import sys
import time

from splitserve.launcher.probe import is_ready
from splitserve.launcher.processes import ChildProcess


def start_service(name, argv, log_dir, address, timeout_s: float = 120.0) -> ChildProcess:
    child = ChildProcess(name, [sys.executable, "-m", "splitserve.services.cli", *argv], log_dir / f"{name}.log",
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    child.start()
    deadline = time.monotonic() + timeout_s
    while not is_ready("grpc", address, 0.5):
        if not child.alive or time.monotonic() > deadline:
            child.kill()
            raise RuntimeError(f"{name} did not start:\n{child.log_tail()}")
        time.sleep(0.2)
    return child
