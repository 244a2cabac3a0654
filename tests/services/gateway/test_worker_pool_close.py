"""WorkerPool.close ends its refresh loop even when a cancel gets swallowed inside a refresh."""

import asyncio

import pytest

from splitserve.services.gateway.workers import WorkerPool


@pytest.mark.timeout(30)  # the bug this guards against hangs forever
def test_close_ends_the_loop_when_a_refresh_swallows_the_cancel():
    async def main() -> float:
        pool = WorkerPool({}, check_interval_s=0.01)
        in_refresh = asyncio.Event()

        async def refresh_that_eats_cancels() -> None:
            # What a client library can do: turn a cancellation that races its own timeout into a timeout error.
            in_refresh.set()
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                raise TimeoutError("timed out") from None

        pool.refresh = refresh_that_eats_cancels
        pool._task = asyncio.create_task(pool._loop())
        await in_refresh.wait()
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(pool.close(), timeout=5.0)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(main()) < 1.0
