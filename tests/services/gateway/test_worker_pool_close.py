"""Stopping a periodic loop (the gateway's health checks, a worker's announcements) ends it even when the
cancel is swallowed inside a step."""

import asyncio

import pytest

from splitserve.services.gateway.workers import WorkerPool


@pytest.mark.timeout(30)  # the bug this guards against hangs forever
def test_close_ends_the_loop_when_a_refresh_swallows_the_cancel():
    async def main() -> float:
        pool = WorkerPool({}, check_interval_s=0.01)
        calls = 0
        in_refresh = asyncio.Event()

        async def refresh_that_eats_cancels() -> None:
            nonlocal calls
            calls += 1
            if calls == 1:  # start()'s own first refresh
                return
            # What a client library can do: turn a cancellation that races its own timeout into a timeout error.
            in_refresh.set()
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                raise TimeoutError("timed out") from None

        pool.refresh = refresh_that_eats_cancels
        await pool.start()
        await in_refresh.wait()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(pool.close(), timeout=5.0)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(main()) < 1.0
