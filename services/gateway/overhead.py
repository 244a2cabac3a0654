"""The gateway's own share of a request's latency: its handling time minus the time it waited on others.

"Others" are the tokenizer, prefill and decode workers (each RPC, and each wait for the next chunk of a decode
stream) and a slot among max_in_flight. What is left is the gateway's work: parsing, validation, routing (the
prefix index lookup in Redis included: it is a cost of routing), formatting, and the event loop's delays. Waits
that overlap (the n sequences of one request, a batch's prompts) count once, as the wall time during which at
least one was pending.

Exported as the histogram splitserve_gateway_overhead_seconds (successful requests only), rather than as a
Server-Timing header: it covers streamed responses (whose headers leave before the work is done) and the gRPC API
alike, it is what operators already scrape, and it shows clients nothing of the internals. A request's timer
travels in a context variable, which every task the request starts inherits, so the code in between need not
pass it along. One limit: a reply that arrives while the event loop is busy is noticed late, and that delay
counts as waiting; under saturation this measure is a lower bound.
"""

from __future__ import annotations

import contextlib
import time
from contextvars import ContextVar
from typing import AsyncIterator, Callable, Iterator, Optional, TypeVar

from splitserve.services.gateway import metrics

T = TypeVar("T")

_CURRENT: ContextVar[Optional["RequestTimer"]] = ContextVar("splitserve_gateway_request_timer", default=None)


class RequestTimer:
    """One request's time in the gateway and the part of it spent waiting on others."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started = clock()
        self._pending = 0                 # waits in progress
        self._pending_since = 0.0
        self.waited_s = 0.0
        self.finished = False

    def begin_wait(self) -> None:
        if self._pending == 0:
            self._pending_since = self._clock()
        self._pending += 1

    def end_wait(self) -> None:
        self._pending -= 1
        if self._pending == 0:
            self.waited_s += self._clock() - self._pending_since

    def own_seconds(self) -> float:
        """Handling time so far less the waits (a wait still pending counted up to now)."""
        now = self._clock()
        waited = self.waited_s + (now - self._pending_since if self._pending else 0.0)
        return max(0.0, now - self._started - waited)

    def finish(self) -> None:
        """Records the request's own time in the histogram, once; later calls and waits change nothing."""
        if not self.finished:
            self.finished = True
            metrics.OVERHEAD.observe(self.own_seconds())


def start_request(clock: Callable[[], float] = time.perf_counter) -> RequestTimer:
    """A timer for the request being handled in this task (and every task it starts from now on)."""
    timer = RequestTimer(clock)
    _CURRENT.set(timer)
    return timer


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Marks the enclosed await as time spent waiting on another service (a no-op outside a request)."""
    timer = _CURRENT.get()
    if timer is None or timer.finished:
        yield
        return
    timer.begin_wait()
    try:
        yield
    finally:
        timer.end_wait()


class WaitedStream(AsyncIterator[T]):
    """Another service's stream (a decode worker's chunks) with each wait for its next item counted as waiting,
    and the time the caller spends on each item not."""

    def __init__(self, stream: AsyncIterator[T]):
        self._stream = stream.__aiter__()

    def __aiter__(self) -> "WaitedStream[T]":
        return self

    async def __anext__(self) -> T:
        with waiting():
            return await self._stream.__anext__()
