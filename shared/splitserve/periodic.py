"""A step run every interval in the background until stopped (worker announcements, gateway health checks)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional


class Periodic:
    """Stopping sets a flag as well as cancelling the task. A cancel that lands inside a client library can come
    out as an ordinary error (redis-py can turn it into its TimeoutError), which the step's own error handling
    absorbs; a loop that relied on the cancel alone then runs on and whoever stops it waits forever (seen in CI,
    about one stop in twenty)."""

    def __init__(self, step: Callable[[], Awaitable[object]], interval_s: float, name: str):
        self._step = step
        self.interval_s = interval_s
        self._name = name
        self._stopping = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval_s)
                return  # stopping
            except asyncio.TimeoutError:
                pass
            await self._step()
