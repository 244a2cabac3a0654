"""Chooses the prefill or decode worker for one sequence.

Policies (the gateway's --router-policy):
- `prefix` (default): the highest weighted sum of the scorers (scorers.py): the share of the prompt the worker's
  cache holds, the share the kv-store holds beyond that (weighted lower), and load. Without prefix hits for any
  candidate (a new prompt, or the index unavailable: prefix_index.py) it is `load`. A new prompt is claimed in
  the index for the worker load picks (in the lookup's round trip), and a prompt whose pick held little of it
  is claimed for that worker after the pick, so the next request sharing the prefix follows it before the
  worker's events arrive. Predictions are checked against the cached tokens workers report
  (routing_accuracy.py): while they disagree, requests are routed by load.
- `load`: the least loaded. Load is counted in sequences first: what this gateway has in flight on the worker
  (from the moment it picked it), plus the sequences the worker reports to the registry beyond this gateway's
  own (other gateway replicas; the report lags by an announce interval). Tokens in flight from this gateway
  break ties, and remaining ties rotate, so idle workers share the work. For equal requests from one gateway
  this keeps any two workers within one sequence of each other (tested with 16 streams on 2 workers).
- `round-robin`, `random`: for comparison (benchmarks) and for deployments that want no state.
Each decision is counted by reason in splitserve_router_decisions_total, once the worker gets the request: a
prefill worker proposed for a prompt the decode worker then prefills itself (prefill_path.py) is not counted.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import NoHealthyWorkerError
from splitserve.services.gateway.prefix_index import PrefixHits, PrefixIndexReader
from splitserve.services.gateway.routing_accuracy import RoutingAccuracy
from splitserve.services.gateway.scorers import (DevicePrefixScorer, LoadScorer, SpeculativePrefixScorer,
                                                 StorePrefixScorer)
from splitserve.services.gateway.workers import Worker, WorkerPool

POLICIES = ("prefix", "load", "round-robin", "random")


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


@dataclass(frozen=True)
class Proposal:
    """A worker the router chose, before the choice is counted (Router.commit)."""
    worker: Worker
    reason: str                       # the decision metric's label
    hits: Optional[PrefixHits]
    candidates: int                   # healthy workers it was chosen among


@dataclass(frozen=True)
class RouterWeights:
    device_prefix: float = 2.0
    store_prefix: float = 0.5
    load: float = 1.0
    speculative_prefix: float = 1.5


class Router:
    def __init__(self, pool: WorkerPool, policy: str = "prefix", weights: RouterWeights = RouterWeights(),
                 index: Optional[PrefixIndexReader] = None, accuracy: Optional[RoutingAccuracy] = None):
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.pool = pool
        self.index = index
        self.policy = policy
        self.accuracy = accuracy or RoutingAccuracy()
        # One rotation per kind: a shared one, advanced by a decode pick and a prefill pick per request, would
        # start every prefill tie at the same worker when there are two.
        self._turns: dict[str, itertools.count] = defaultdict(itertools.count)
        self._claim_turns: dict[str, itertools.count] = defaultdict(itertools.count)  # the claims' own rotation
        self._scorers = [(weights.device_prefix, DevicePrefixScorer()), (weights.store_prefix, StorePrefixScorer()),
                         (weights.speculative_prefix, SpeculativePrefixScorer()),
                         (weights.load, LoadScorer(lambda w: worker_load(w)[0]))]

    async def prefix_hits(self, prompt: list[int]) -> Optional[PrefixHits]:
        """What the prefix index knows about the prompt, for pick(); None without an index or when it cannot
        answer in time (never an error: the request is routed by load)."""
        if self.policy != "prefix" or self.index is None:
            return None
        route = self.accuracy.route_by_prefix()
        claims = {}
        if route:
            for kind in ("decode", "prefill"):
                candidates = self.pool.healthy(kind)
                if len(candidates) > 1:
                    start = next(self._claim_turns[kind]) % len(candidates)
                    claims[kind] = min(candidates[start:] + candidates[:start], key=worker_load).address
        hits = await self.index.lookup(prompt, claims)
        if hits is not None:
            hits.route = route
        return hits

    def feedback(self, worker: Worker, hits: Optional[PrefixHits], cached_tokens: int) -> None:
        """The cached tokens `worker` reported for the prompt it computed, against what the index predicted."""
        if hits is None:
            return
        self.accuracy.observe(worker.kind, worker.address, hits.reusable_tokens(worker.kind, worker.address),
                              cached_tokens)

    def pick(self, kind: str, prompt_len: int, exclude: Iterable[Worker] = (),
             hits: Optional[PrefixHits] = None) -> Worker:
        """A healthy worker of `kind` not in `exclude`; NoHealthyWorkerError if there is none. `hits`: what the
        prefix index said about this prompt (None: unknown)."""
        return self.commit(self.propose(kind, exclude, hits))

    def propose(self, kind: str, exclude: Iterable[Worker] = (), hits: Optional[PrefixHits] = None) -> Proposal:
        """The worker pick() would choose, not yet counted or claimed: for a choice that may not use it (a
        prefill worker before the prefill path is chosen). NoHealthyWorkerError if there is none."""
        excluded = set(map(id, exclude))
        candidates = [w for w in self.pool.healthy(kind) if id(w) not in excluded]
        if not candidates:
            metrics.ROUTER_DECISIONS.labels(kind, "no_healthy_worker").inc()
            raise NoHealthyWorkerError(kind)
        chosen, reason = self._choose(kind, candidates, hits)
        return Proposal(chosen, reason, hits, len(candidates))

    def commit(self, proposal: Proposal) -> Worker:
        """The proposed worker gets the request: the decision is counted and, when its known prefix is short,
        the prompt is claimed for it (so the next request sharing the prefix follows it)."""
        chosen, hits, kind = proposal.worker, proposal.hits, proposal.worker.kind
        metrics.ROUTER_DECISIONS.labels(kind, proposal.reason).inc()
        if hits is not None:
            metrics.PREDICTED_CACHED_TOKENS.labels(kind).inc(hits.device_tokens(kind, chosen.address))
            known = hits.device_tokens(kind, chosen.address) + hits.speculative_tokens(kind, chosen.address)
            if hits.route and self.index is not None and proposal.candidates > 1 and 2 * known < hits.prompt_tokens:
                self.index.claim_later(hits, kind, chosen.address)
        return chosen

    def propose_optional(self, kind: str, hits: Optional[PrefixHits] = None) -> Optional[Proposal]:
        """Like propose, but None when no worker of `kind` is healthy (for optional stages such as prefill); one
        the deployment has none of (aggregated: no prefill workers) is no decision, so none is counted."""
        if not self.pool.workers(kind):
            return None
        try:
            return self.propose(kind, hits=hits)
        except NoHealthyWorkerError:
            return None

    def _choose(self, kind: str, candidates: list[Worker], hits: Optional[PrefixHits]) -> tuple[Worker, str]:
        if len(candidates) == 1:
            return candidates[0], "only_candidate"
        if self.policy == "random":
            return random.choice(candidates), "random"
        start = next(self._turns[kind]) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        if self.policy == "round-robin":
            return rotated[0], "round_robin"
        if self.policy == "prefix" and hits is not None and hits.route and hits.prompt_tokens and (
                hits.store_tokens or any(hits.device_tokens(kind, w.address) + hits.speculative_tokens(kind, w.address)
                                         for w in candidates)):
            # max() keeps the first of equals: ties go to the less loaded, then in rotation.
            ordered = sorted(rotated, key=worker_load)
            chosen = max(ordered, key=lambda w: self._score(w, hits))
            if hits.device_tokens(kind, chosen.address):
                return chosen, "prefix_hit"
            return chosen, "speculative_hit" if hits.speculative_tokens(kind, chosen.address) else "least_loaded"
        chosen = min(rotated, key=worker_load)
        return chosen, "least_loaded" if worker_load(chosen) < max(map(worker_load, candidates)) else "tie"

    def _score(self, worker: Worker, hits: Optional[PrefixHits]) -> float:
        return sum(weight * scorer.score(worker, hits) for weight, scorer in self._scorers)
