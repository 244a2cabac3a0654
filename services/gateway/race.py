"""A request's work, run until it ends or something stops it first: the client went away, or the gateway gave up on
it (the drain's grace ran out). Shared by the REST responses (sse.py) and the gRPC API."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from splitserve.services.gateway.errors import ShutdownError

T = TypeVar("T")


async def first_of(task: asyncio.Future, *stops: asyncio.Future) -> None:
    """Waits until `task` or one of `stops` ends; then cancels the rest and waits for them, so `task` is done
    (cancelled unless it ended first) however this returns."""
    try:
        await asyncio.wait({task, *stops}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for other in (task, *stops):
            other.cancel()
        await asyncio.gather(task, *stops, return_exceptions=True)


async def unless_set(work: Awaitable[T], aborted: asyncio.Event) -> T:
    """`work`'s result, or ShutdownError once `aborted` is set first."""
    task = asyncio.ensure_future(work)
    await first_of(task, asyncio.ensure_future(aborted.wait()))
    if task.cancelled():
        raise ShutdownError()
    return task.result()
