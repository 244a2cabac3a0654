"""Whether one health check's outcome takes a worker out of routing.

A worker that refuses the connection or says NOT_SERVING is out at once: it is down or draining. A check that
times out is another matter: a worker streaming a thousand sequences can answer late and still be making
progress, and taking it out turns its share of the traffic into 503s (seen at 1,200 concurrent requests with
a 1 s timeout: 64 requests failed `no_healthy_worker` while the decode worker was streaming). So a timeout
makes a healthy worker "slow" (counted), and takes it out only after `max_slow_checks` timeouts in a row with no
sign of progress (a fresh registry announcement, a token from one of its streams) within `progress_window_s`.
A timeout never brings in a worker that was out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2


class Outcome(enum.Enum):
    SERVING = "serving"
    NOT_SERVING = "not_serving"    # the worker answered: draining, starting or broken
    SLOW = "slow"                  # no answer within the timeout
    DOWN = "down"                  # connection refused, reset, or any other error
    REJECTED = "rejected"          # answers, but has not proven it belongs (services/gateway/membership_check.py)


@dataclass(frozen=True)
class CheckResult:
    outcome: Outcome
    reason: str = ""


def from_reply(status: int) -> CheckResult:
    if status == health_pb2.HealthCheckResponse.SERVING:
        return CheckResult(Outcome.SERVING)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    return CheckResult(Outcome.NOT_SERVING, f"health check says {name}")


def from_error(exc: grpc.aio.AioRpcError) -> CheckResult:
    reason = f"health check failed: {exc.code().name} {exc.details() or ''}".strip()
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CheckResult(Outcome.SLOW, reason)
    return CheckResult(Outcome.DOWN, reason)


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    slow_checks: int               # timeouts in a row so far
    reason: str                    # why not healthy ("" when healthy)


@dataclass(frozen=True)
class HealthPolicy:
    max_slow_checks: int = 3
    progress_window_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_slow_checks < 1:
            raise ValueError(f"max_slow_checks must be >= 1, got {self.max_slow_checks}")

    def judge(self, result: CheckResult, *, healthy: bool, slow_checks: int, last_progress: float,
              now: float) -> Verdict:
        """The worker's state after `result`; `last_progress` and `now` are on the same monotonic clock."""
        if result.outcome is Outcome.SERVING:
            return Verdict(True, 0, "")
        if result.outcome is not Outcome.SLOW:
            return Verdict(False, 0, result.reason)
        slow_checks += 1
        if not healthy:
            return Verdict(False, slow_checks, result.reason)
        if self.progressing(last_progress, now) or slow_checks < self.max_slow_checks:
            return Verdict(True, slow_checks, "")
        return Verdict(False, slow_checks, f"{result.reason} ({slow_checks} in a row, no progress for "
                                           f"{self.progress_window_s:g} s)")

    def progressing(self, last_progress: float, now: float) -> bool:
        return now - last_progress <= self.progress_window_s
