"""Chooses the prefill or decode worker for one sequence: the healthy one with the least load.

Load is counted in sequences first: what this gateway has in flight on the worker (from the moment it picked
it), plus the sequences the worker reports to the registry beyond this gateway's own (other gateway replicas;
the report lags by an announce interval). Tokens in flight from this gateway break ties, and remaining ties
rotate, so idle workers share the work. For equal requests from one gateway this keeps any two workers within
one sequence of each other, plus whatever other gateways run there (tested with 16 streams on 2 workers).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import NoHealthyWorkerError
from splitserve.services.gateway.workers import Worker, WorkerPool


def worker_load(worker: Worker) -> tuple[int, int]:
    """(sequences, this gateway's tokens) on the worker; lower is less loaded.

    The worker's report includes this gateway's own requests: only what it reports beyond them is added, so a
    lagging report neither double-counts this gateway's work nor outweighs a sequence picked a moment ago.
    """
    sequences = worker.in_flight_requests
    if worker.reported is not None:
        reported = worker.reported.num_running + worker.reported.num_waiting
        sequences += max(0, reported - worker.in_flight_requests)
    return sequences, worker.in_flight_tokens


class Router:
    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self._turn = itertools.count()

    def pick(self, kind: str, prompt_len: int, exclude: Iterable[Worker] = ()) -> Worker:
        """The least loaded healthy worker of `kind` not in `exclude`; NoHealthyWorkerError if there is none.

        prompt_len is not scored: routing does not yet know which worker holds a prompt's blocks.
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
