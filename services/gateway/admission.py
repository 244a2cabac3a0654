"""Which requests the gateway is serving, so that a draining gateway refuses new ones and waits for the rest."""

from __future__ import annotations

import asyncio

from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import DrainingError


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
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._tickets: set[Ticket] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self) -> Ticket:
        if self.draining:
            raise DrainingError()
        ticket = Ticket(self)
        self._tickets.add(ticket)
        self.in_flight += 1
        self._idle.clear()
        metrics.IN_FLIGHT.inc()
        return ticket

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def abort_all(self) -> None:
        """The drain's grace ran out: every request still in flight ends now, with an error."""
        for ticket in self._tickets:
            ticket.aborted.set()

    def _release(self, ticket: Ticket) -> None:
        self._tickets.discard(ticket)
        self.in_flight -= 1
        metrics.IN_FLIGHT.dec()
        if self.in_flight == 0:
            self._idle.set()
