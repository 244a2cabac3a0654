"""Which requests the gateway is serving, and which wait for a turn.

At most `max_in_flight` requests run at once; up to `max_queued` more wait, first come first served; beyond
that a request is shed at once (429 / RESOURCE_EXHAUSTED) rather than queued without bound: at 1,200
concurrent requests an unbounded queue made the median wait 78 s, longer than clients wait. A draining
gateway refuses new requests, sends the queued ones away, and waits for the running ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from splitserve.services.gateway import metrics, overhead
from splitserve.services.gateway.errors import DrainingError, OverloadedError

log = logging.getLogger(__name__)

# What a shed request is told to wait before retrying: one second is enough for a slot to open on a busy
# server, short enough that clients do not go away.
RETRY_AFTER_S = 1
_SHED_LOG_INTERVAL_S = 10.0


class Ticket:
    """One admitted request; release() exactly once, when its response is complete (or abandoned)."""

    def __init__(self, admission: "Admission"):
        self._admission = admission
        self._released = False
        # Set when the gateway stops waiting for this request; its response should end with an error.
        self.aborted = asyncio.Event()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)


class Admission:
    def __init__(self, max_in_flight: int = 256, max_queued: int = 256) -> None:
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queued >= 0")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.draining = False
        self.in_flight = 0     # slots taken, including ones handed to a waiter that has not resumed yet
        self._tickets: set[Ticket] = set()
        self._waiting: collections.deque[asyncio.Future] = collections.deque()
        self._idle = asyncio.Event()
        self._idle.set()
        self._shed_since_log = 0
        self._shed_logged_at = float("-inf")

    async def admit(self) -> Ticket:
        """A ticket once a slot is free. Raises OverloadedError if the queue is full, DrainingError if the
        gateway is (or starts) draining. Cancelling the caller leaves the queue cleanly."""
        if self.draining:
            raise DrainingError()
        if self.in_flight < self.max_in_flight and not self._waiting:
            self.in_flight += 1
        else:
            await self._wait_for_slot()
        ticket = Ticket(self)
        self._tickets.add(ticket)
        self._idle.clear()
        metrics.IN_FLIGHT.inc()
        return ticket

    async def _wait_for_slot(self) -> None:
        if len(self._waiting) >= self.max_queued:
            self._shed()
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        metrics.QUEUED.inc()
        try:
            with overhead.waiting():
                await waiter    # _hand_out_slots counted this request in flight before waking it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give_back_slot()    # woken and cancelled in the same turn: the slot goes to the next
            elif waiter in self._waiting:
                self._waiting.remove(waiter)
            raise
        finally:
            metrics.QUEUED.dec()

    def _shed(self) -> None:
        metrics.SHED.inc()
        self._shed_since_log += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= _SHED_LOG_INTERVAL_S:   # under overload, one line per interval
            log.warning("overloaded: %d requests running, %d queued; shed %d requests (429) since the last report",
                        self.in_flight, len(self._waiting), self._shed_since_log)
            self._shed_since_log, self._shed_logged_at = 0, now
        raise OverloadedError(RETRY_AFTER_S)

    def _hand_out_slots(self) -> None:
        while self._waiting and self.in_flight < self.max_in_flight:
            waiter = self._waiting.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)

    def _give_back_slot(self) -> None:
        self.in_flight -= 1
        self._hand_out_slots()
        if self.in_flight == 0:
            self._idle.set()

    def start_draining(self) -> None:
        self.draining = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(DrainingError())

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def abort_all(self) -> None:
        """The drain's grace ran out: every request still in flight ends now, with an error."""
        for ticket in self._tickets:
            ticket.aborted.set()

    def _release(self, ticket: Ticket) -> None:
        self._tickets.discard(ticket)
        metrics.IN_FLIGHT.dec()
        self._give_back_slot()
