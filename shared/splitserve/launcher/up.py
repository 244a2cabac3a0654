"""`splitserve up`: the whole stack on this machine in one command.

stdout gets exactly one line, `splitserve ready: http://HOST:PORT/v1`, once every service answers its health
check (through Envoy when it runs), so scripts can wait for it; everything else goes to stderr and to one log file
per process in the log dir. SIGINT/SIGTERM stop everything, front to back, and exit 0. A child that dies while
the stack runs is logged and restarted on the same ports (bounded: --max-restarts within --restart-window-s); the
rest keep serving meanwhile (the gateway routes around a dead worker or tokenizer).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from splitserve.launcher.errors import LauncherError
from splitserve.launcher.plan import SERVICE_COMMAND, StackConfig
from splitserve.launcher.stack import Stack
from splitserve.serving.logs import setup_logging
from splitserve.serving.settings import log_settings, parse_settings

log = logging.getLogger("splitserve.up")


class StopRequested(Exception):
    """Raised in the main thread by SIGINT/SIGTERM, so a start in progress unwinds and stops what it started."""


def _install_stop_signals(stop: threading.Event) -> None:
    def on_signal(signum, _frame):
        if stop.is_set():
            return  # already stopping; let the shutdown finish in order
        stop.set()
        log.info("%s received, stopping the stack", signal.Signals(signum).name)
        raise StopRequested()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def _describe(stack: Stack) -> str:
    lines = [f"  {spec.name:<12} {spec.address or '':<22} log {stack.log_dir / (spec.name + '.log')}"
             for tier in stack.plan.tiers for spec in tier]
    lines.append(f"  OpenAI API   {stack.base_url}")
    lines.append(f"  gRPC API     {stack.grpc_address} (splitserve.v1.Gateway)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, *, service_command: Sequence[str] = SERVICE_COMMAND) -> int:
    """`service_command` is for tests only: it swaps the real services for stand-ins."""
    config = parse_settings(StackConfig, argv, prog="splitserve up")
    setup_logging("up", config.log_level)
    log_settings("up", config)
    stop = threading.Event()
    _install_stop_signals(stop)
    stack = Stack(config, service_command=service_command)
    try:
        print(f"splitserve up: logs in {stack.log_dir}", file=sys.stderr, flush=True)
        if config.model is None:
            print("splitserve up: no --model given, serving the tiny offline demo model: its weights are random, "
                  "so its text is random too", file=sys.stderr, flush=True)
        stack.start()
        print(f"splitserve up: started\n{_describe(stack)}", file=sys.stderr, flush=True)
        print(f"splitserve ready: {stack.base_url}", flush=True)
        while not stop.wait(1.0):  # a timed wait lets the signal handler run; the supervisor restarts children
            pass
    except StopRequested:
        pass
    except LauncherError as exc:
        stop.set()
        print(f"splitserve up: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop.set()  # further signals are ignored while the stack stops in order
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
