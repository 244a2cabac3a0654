"""A service's health is answered on its own thread while its event loop is stuck (a saturated engine worker's
loop, at its worst), and says NOT_SERVING there too once the service drains."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.serving.grpc_service import GrpcService

pytestmark = pytest.mark.timeout(60)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _check(address: str, timeout_s: float = 1.0):
    """The status, or the gRPC code of the failure."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=timeout_s).status
        except grpc.RpcError as exc:
            return exc.code()


def test_health_answers_on_its_thread_while_the_event_loop_is_stuck():
    seen = {}

    async def main() -> None:
        service = GrpcService("test", "127.0.0.1", 0, None, ["splitserve.v1.Test"], grace_s=1, health_port=0)
        started = asyncio.Event()

        async def on_started() -> None:
            started.set()

        drained = asyncio.Event()

        async def drain() -> None:
            seen["draining"] = await asyncio.to_thread(_check, health_address)
            drained.set()

        task = asyncio.create_task(service.run(drain=drain, on_started=on_started))
        await started.wait()
        await asyncio.sleep(0.1)  # SERVING is set right after on_started
        main_address = f"127.0.0.1:{service.port}"
        health_address = f"127.0.0.1:{service.health_thread.port}"
        seen["before"] = _check(health_address)

        def probe() -> None:
            time.sleep(0.3)       # the loop is stuck by now
            seen["thread"] = _check(health_address)
            seen["main"] = _check(main_address, timeout_s=0.5)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(3)             # what a swamped loop looks like to a caller: no turn for 3 s
        await asyncio.to_thread(prober.join)
        service.request_stop()
        await task
        assert drained.is_set()

    asyncio.run(main())
    assert seen["before"] == SERVING
    assert seen["thread"] == SERVING                      # answered within 1 s while the loop was stuck
    assert seen["main"] == grpc.StatusCode.DEADLINE_EXCEEDED   # the loop's own health could not answer
    assert seen["draining"] == NOT_SERVING


def test_a_loop_stuck_longer_than_the_stall_limit_is_reported_not_serving():
    seen = {}

    async def main() -> None:
        service = GrpcService("test", "127.0.0.1", 0, None, [], grace_s=1, health_port=0)
        service.health_thread.stall_s = 1.0
        started = asyncio.Event()

        async def on_started() -> None:
            started.set()

        task = asyncio.create_task(service.run(on_started=on_started))
        await started.wait()
        await asyncio.sleep(0.1)
        address = f"127.0.0.1:{service.health_thread.port}"

        def probe() -> None:
            time.sleep(2.0)       # past the limit: the loop is stuck, not busy
            seen["stuck"] = _check(address)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(2.5)
        await asyncio.to_thread(prober.join)
        await asyncio.sleep(0.1)  # the loop turns again
        seen["after"] = await asyncio.to_thread(_check, address)
        service.request_stop()
        await task

    asyncio.run(main())
    assert seen["stuck"] == NOT_SERVING
    assert seen["after"] == SERVING
