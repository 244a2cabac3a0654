"""The gateway's own time per request (splitserve_gateway_overhead_seconds): its handling time less its waits on
the tokenizer and workers, overlapping waits counted once, for streamed, non-streamed and gRPC requests."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from splitserve.client import Client
from splitserve.services.gateway import overhead


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_overlapping_waits_count_once_and_the_rest_is_the_gateways_own():
    clock = FakeClock()
    timer = overhead.RequestTimer(clock)
    clock.now += 0.001                      # parsing: the gateway's
    timer.begin_wait()                      # sequence 0 waits on its worker
    clock.now += 0.010
    timer.begin_wait()                      # sequence 1 too, meanwhile
    clock.now += 0.020
    timer.end_wait()
    clock.now += 0.005
    timer.end_wait()                        # 35 ms with at least one wait pending
    clock.now += 0.002                      # formatting: the gateway's
    assert timer.waited_s == pytest.approx(0.035)
    assert timer.own_seconds() == pytest.approx(0.003)
    timer.begin_wait()                      # a wait still pending counts up to now
    clock.now += 0.004
    assert timer.own_seconds() == pytest.approx(0.003)


def _observed() -> tuple[float, float]:
    return (REGISTRY.get_sample_value("splitserve_gateway_overhead_seconds_count") or 0.0,
            REGISTRY.get_sample_value("splitserve_gateway_overhead_seconds_sum") or 0.0)


def test_waits_in_child_tasks_and_streams_count_and_the_callers_work_does_not():
    """The timer reaches tasks the request starts (a batch's prompts, the n sequences), and a stream's time
    counts as waiting only while the next item is awaited."""
    clock = FakeClock()

    async def stream():
        for item in range(3):
            await asyncio.sleep(0)
            clock.now += 0.010              # the worker computing the next chunk
            yield item

    async def request() -> overhead.RequestTimer:
        timer = overhead.start_request(clock)

        async def rpc():
            with overhead.waiting():
                await asyncio.sleep(0)
                clock.now += 0.020
                await asyncio.sleep(0)

        # Both pending from the start to the end: each lasts 40 ms, and together they waited 40 ms, not 80.
        await asyncio.gather(rpc(), rpc())
        async for _ in overhead.WaitedStream(stream()):
            clock.now += 0.001              # formatting each chunk: the gateway's
        return timer

    timer = asyncio.run(request())
    assert timer.waited_s == pytest.approx(0.040 + 3 * 0.010)
    assert timer.own_seconds() == pytest.approx(0.003)
    count, _ = _observed()
    timer.finish()
    timer.finish()
    assert _observed()[0] == count + 1      # observed once


def test_outside_a_request_waiting_is_a_no_op():
    async def no_request():
        with overhead.waiting():
            await asyncio.sleep(0)

    asyncio.run(no_request())


@pytest.mark.parametrize("api", ["rest", "rest-stream", "grpc"])
def test_each_successful_request_observes_its_own_time_without_the_workers(make_stack, api):
    """Five tokens 0.2 s apart: about a second in the decode worker, none of it the gateway's own."""
    stack = make_stack(decode={"token_delay_s": 0.2})
    gateway = stack.start_gateway()
    count, total = _observed()
    if api == "grpc":
        async def call():
            async with Client(gateway.grpc_address) as client:
                return await client.generate("x 40", max_tokens=5, ignore_eos=True)

        assert len(stack.loop.run(call()).token_ids) == 5
    elif api == "rest":
        result = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=5)
        assert result.usage.completion_tokens == 5
    else:
        chunks = list(gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=5,
                                                           stream=True))
        assert len([c for c in chunks if c.choices and c.choices[0].text]) == 5
    # A stream's client may read its last chunk before the gateway's handler has run past it and recorded the
    # request: wait for that bookkeeping (bounded), then require exactly one observation.
    deadline = time.monotonic() + 10.0
    while _observed()[0] == count and time.monotonic() < deadline:
        time.sleep(0.01)
    new_count, new_total = _observed()
    assert new_count == count + 1
    # The decode worker held the request for 4 x 0.2 s after the prefill's first token: none of that is the
    # gateway's (its own work here is milliseconds; the bound is loose for a busy machine).
    assert 0 < new_total - total < 0.4


def test_refused_requests_are_not_observed(gateway):
    count, _ = _observed()
    with pytest.raises(Exception):
        gateway.openai().completions.create(model="no-such-model", prompt="x 40", max_tokens=5)
    assert _observed()[0] == count
