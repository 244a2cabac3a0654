"""Pins and reservations as leases: ids, expiry times, and the order in which they fall due.

A lease only records what it holds; the BlockStore, which owns pin counts and slots, lets go of them when a
lease ends. Expiry is checked against an injected clock, so tests move time instead of sleeping.
"""

from __future__ import annotations

import heapq
import math
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from splitserve.services.kv_store.block_layout import LayoutKey

UNTIL_RELEASED = math.inf  # for leases a live RPC holds and always releases itself


class UnknownLeaseError(LookupError):
    """A pin or reservation id the store does not hold: never issued, released, or expired."""


@dataclass(eq=False)
class Lease:
    """A pin (pinned blocks only) or a reservation (pinned present blocks plus new, still invisible slots).

    Blocks are named by hash: a lease holds blocks of its one layout.
    """

    lease_id: str
    request_id: str
    layout_key: LayoutKey
    expires_at: float
    pinned: list[bytes] = field(default_factory=list)  # a hash pinned twice is listed twice
    reserved: dict[bytes, int] = field(default_factory=dict)  # hash -> slot taken for it

    @property
    def num_blocks(self) -> int:
        return len(self.pinned) + len(self.reserved)


class LeaseTable:
    def __init__(self, default_lease_s: float, clock: Callable[[], float]):
        self.default_lease_s = default_lease_s
        self.clock = clock
        self._leases: dict[str, Lease] = {}
        self._due: list[tuple[float, str]] = []  # heap of (expires_at, lease_id); ended leases are skipped

    def open(self, kind: str, layout_key: LayoutKey, lease_s: Optional[float], request_id: str) -> Lease:
        """A new lease of `lease_s` seconds (None: the default; UNTIL_RELEASED: no expiry)."""
        expires_at = self.clock() + (self.default_lease_s if lease_s is None else lease_s)
        lease = Lease(f"{kind}-{uuid.uuid4().hex}", request_id, layout_key, expires_at)
        self._leases[lease.lease_id] = lease
        if expires_at != math.inf:
            heapq.heappush(self._due, (expires_at, lease.lease_id))
        return lease

    def find(self, lease_id: str) -> Optional[Lease]:
        return self._leases.get(lease_id)

    def get(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise UnknownLeaseError(f"no reservation or pin {lease_id!r}: never issued, already ended, or expired")
        return lease

    def close(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]

    def pop_expired(self) -> Iterator[Lease]:
        """Closes and yields every lease whose time is up."""
        now = self.clock()
        while self._due and self._due[0][0] <= now:
            _, lease_id = heapq.heappop(self._due)
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                yield lease
