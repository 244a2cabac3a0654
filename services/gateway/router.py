"""Chooses the prefill or decode worker for one sequence: the healthy one with the least load.

Load, in tokens: what this gateway has in flight on the worker (prompt + max new tokens per sequence), plus
what the worker itself reported to the registry (running and waiting sequences, which include other
gateways' requests) weighed at `REPORTED_SEQUENCE_TOKENS` each. The gateway's own count reacts at once; the
reported one covers other gateway replicas but lags by an announce interval. Ties rotate, so idle workers
share the work instead of the first one taking all of it.

Prefix-cache-aware scoring (longest run of cached leading blocks) will plug in here as a bonus per worker.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import NoHealthyWorkerError
from splitserve.services.gateway.workers import Worker, WorkerPool

# A sequence a worker reports as running or waiting counts like this many tokens of the gateway's own load:
# a typical chat request (a few hundred prompt tokens plus the answer).
REPORTED_SEQUENCE_TOKENS = 512


def worker_load(worker: Worker) -> int:
    load = worker.in_flight_tokens
    if worker.reported is not None:
        load += REPORTED_SEQUENCE_TOKENS * (worker.reported.num_running + worker.reported.num_waiting)
    return load


class Router:
    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self._turn = itertools.count()

    def pick(self, kind: str, prompt_len: int, exclude: Iterable[Worker] = ()) -> Worker:
        """The least loaded healthy worker of `kind` not in `exclude`; NoHealthyWorkerError if there is none.

        prompt_len is not scored yet; it is the input prefix-aware routing needs.
        """
        excluded = set(map(id, exclude))
        candidates = [w for w in self.pool.healthy(kind) if id(w) not in excluded]
        if not candidates:
            metrics.ROUTER_DECISIONS.labels(kind, "no_healthy_worker").inc()
            raise NoHealthyWorkerError(kind)
        if len(candidates) == 1:
            metrics.ROUTER_DECISIONS.labels(kind, "only_candidate").inc()
            return candidates[0]
        start = next(self._turn) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        chosen = min(rotated, key=worker_load)
        reason = "least_loaded" if worker_load(chosen) < max(map(worker_load, candidates)) else "tie"
        metrics.ROUTER_DECISIONS.labels(kind, reason).inc()
        return chosen

    def pick_optional(self, kind: str, prompt_len: int) -> Optional[Worker]:
        """Like pick, but None when no worker of `kind` is healthy (for optional stages such as prefill)."""
        try:
            return self.pick(kind, prompt_len)
        except NoHealthyWorkerError:
            return None
