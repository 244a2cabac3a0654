"""A busy worker is not declared dead by one late health answer; a worker that is down is, at once.

The policy alone (pure), then the pool against real gRPC servers whose health check hangs or whose port is shut.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from splitserve.services.gateway.health_policy import CheckResult, HealthPolicy, Outcome
from splitserve.services.gateway.workers import WorkerPool

from .conftest import free_port

SLOW = CheckResult(Outcome.SLOW, "health check failed: DEADLINE_EXCEEDED")
DOWN = CheckResult(Outcome.DOWN, "health check failed: UNAVAILABLE")


def _run(policy: HealthPolicy, results, *, last_progress: float = float("-inf"), healthy: bool = True):
    """Feeds `results` one per second from t=100; returns the health after each."""
    slow, states = 0, []
    for second, result in enumerate(results):
        verdict = policy.judge(result, healthy=healthy, slow_checks=slow, last_progress=last_progress,
                               now=100.0 + second)
        healthy, slow = verdict.healthy, verdict.slow_checks
        states.append(healthy)
    return states


def test_one_timeout_does_not_take_a_worker_out_but_a_run_of_them_does():
    policy = HealthPolicy(max_slow_checks=3, progress_window_s=5)
    assert _run(policy, [SLOW]) == [True]
    assert _run(policy, [SLOW, SLOW, SLOW, SLOW]) == [True, True, False, False]
    assert _run(policy, [SLOW, SLOW, CheckResult(Outcome.SERVING), SLOW, SLOW]) == [True] * 5  # run restarts


def test_a_worker_making_progress_stays_in_through_any_number_of_timeouts():
    policy = HealthPolicy(max_slow_checks=2, progress_window_s=5)
    assert _run(policy, [SLOW] * 6, last_progress=104.0) == [True] * 6      # progress at t=104 covers 100..105
    assert _run(policy, [SLOW] * 8, last_progress=100.0) == [True] * 6 + [False] * 2  # stale after t=105


def test_down_or_not_serving_or_rejected_is_out_at_once_even_while_progressing():
    policy = HealthPolicy()
    for result in (DOWN, CheckResult(Outcome.NOT_SERVING, "NOT_SERVING"), CheckResult(Outcome.REJECTED, "no")):
        assert _run(policy, [result], last_progress=100.0) == [False]


def test_a_timeout_never_brings_a_worker_in():
    assert _run(HealthPolicy(), [SLOW, SLOW], last_progress=100.0, healthy=False) == [False, False]


def test_the_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        HealthPolicy(max_slow_checks=0)


class HangingHealth(health_pb2_grpc.HealthServicer):
    """Answers SERVING, or (while `hang` is set) later than any timeout: a worker whose event loop is swamped."""

    def __init__(self) -> None:
        self.hang = False

    async def Check(self, request, context):
        if self.hang:
            await asyncio.sleep(5)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _slow(kind: str = "decode") -> float:
    return REGISTRY.get_sample_value("splitserve_gateway_slow_health_checks_total", {"kind": kind}) or 0.0


def test_the_pool_keeps_a_slow_progressing_worker_and_drops_it_when_progress_stops(loop_thread):
    async def scenario():
        server = grpc.aio.server()
        servicer = HangingHealth()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        pool = WorkerPool({"decode": [address]}, check_timeout_s=0.1,
                          policy=HealthPolicy(max_slow_checks=2, progress_window_s=0.5))
        try:
            await pool.refresh()
            [worker] = pool.workers("decode")
            assert worker.healthy
            before = _slow()
            servicer.hang = True
            for _ in range(4):                       # streams are progressing: slow, not down
                pool.note_progress(worker)
                await pool.refresh()
                assert worker.healthy, worker.why_unhealthy
            assert _slow() == before + 4
            await asyncio.sleep(0.6)                 # no progress for longer than the window
            await pool.refresh()
            assert not worker.healthy and "DEADLINE_EXCEEDED" in worker.why_unhealthy
            servicer.hang = False
            await pool.refresh()
            assert worker.healthy
        finally:
            await pool.close()
            await server.stop(None)

    loop_thread.run(scenario())


def test_the_pool_drops_a_refusing_worker_at_the_first_check_even_while_progressing(loop_thread):
    async def scenario():
        pool = WorkerPool({"decode": [f"127.0.0.1:{free_port()}"]}, check_timeout_s=0.5)
        try:
            [worker] = pool.workers("decode")
            worker.healthy = True                    # as if it had passed checks before its process died
            pool.note_progress(worker)
            await pool.refresh()
            assert not worker.healthy and "UNAVAILABLE" in worker.why_unhealthy
        finally:
            await pool.close()

    loop_thread.run(scenario())
