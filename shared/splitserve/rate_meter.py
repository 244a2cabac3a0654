"""A rate (units per second) measured from observed (amount, seconds) pairs, recent ones weighing most.

Used where a worker measures how fast it does something and announces it (prefill tokens/s, KV bytes/s): the
gateway compares those rates to choose a request's prefill path (services/gateway/prefill_path.py).

The rate is a ratio of exponentially decayed sums, not a mean of per-observation rates: a step that prefilled
2,000 tokens counts 100 times as much as one that prefilled 20, so the fixed cost of tiny steps does not drag the
rate far below what a long prompt sees. Each observation decays the older ones by `1 - weight`, so a worker that
slows down (more load, fewer cores) shows it within a handful of observations.
"""

from __future__ import annotations

import threading
from typing import Optional


class RateMeter:
    def __init__(self, weight: float = 0.2, min_amount: float = 0.0):
        """`min_amount`: smaller observations are ignored (their fixed costs would stand for the rate)."""
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.weight = weight
        self.min_amount = min_amount
        self._amount = 0.0
        self._seconds = 0.0
        self._lock = threading.Lock()   # observed on an engine or transfer thread, read on the event loop

    def observe(self, amount: float, seconds: float) -> None:
        """`amount` units done in `seconds`; observations of nothing (or of no time) are ignored."""
        if amount <= 0 or amount < self.min_amount or seconds <= 0:
            return
        with self._lock:
            if self._seconds == 0:
                self._amount, self._seconds = amount, seconds
                return
            keep = 1 - self.weight
            self._amount = keep * self._amount + self.weight * amount
            self._seconds = keep * self._seconds + self.weight * seconds

    @property
    def rate(self) -> Optional[float]:
        """Units per second, or None before the first observation."""
        with self._lock:
            return self._amount / self._seconds if self._seconds else None
