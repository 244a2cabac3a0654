"""Routing-accuracy feedback: does the prefix index predict what the workers really reuse?

For each request the router predicted cached tokens on the worker it chose (prefill: its own cache, or the
kv-store beyond it; decode prefilling locally: its own cache). The worker then reports `cached_tokens`. Over the
last `window` requests where either said there was a hit, the agreement is sum(min(predicted, actual)) /
sum(max(predicted, actual)): 1 when the index is exact, lower when it promises blocks the worker does not reuse
(lost events, a stale index) or misses blocks the worker does reuse (hashes computed differently: block size,
hash seed, tokenizer or chat template). A stale index only costs recomputes, so nobody notices by errors: the
index's users lose 10-20 % of their hits or all of them silently (llm-d #1861, SGLang #7773).

Below `threshold` over a full window: ONE warning naming the worst-predicted workers and the likely causes, the
gauge `splitserve_router_routing_degraded` at 1, and routing by load (prefix routing that is wrong costs a
worker's queue for nothing), except each `probe_every`-th request, routed by prefix to keep measuring; lookups
go on for every request, so each request's prediction for the worker load routing chose is measured too. A full
window at or above the threshold resumes prefix routing. Only confirmed hits count as predicted, never claims
(speculative entries): a claimed prefill may still be running.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from splitserve.services.gateway import metrics

log = logging.getLogger(__name__)

LIKELY_CAUSES = ("the workers' block size or hash seed (model identity) differs from the one they publish, the "
                 "gateway's tokenizer or chat template differs from the one the prompts were cached with, or KV "
                 "events are lost (a publisher that cannot reach Redis, a stale index)")


@dataclass(frozen=True)
class _Sample:
    worker: str
    predicted: int
    actual: int


class RoutingAccuracy:
    def __init__(self, threshold: float = 0.5, window: int = 50, probe_every: int = 10):
        if not 0 <= threshold <= 1 or window < 1 or probe_every < 1:
            raise ValueError("routing accuracy needs 0 <= threshold <= 1, window >= 1 and probe_every >= 1")
        self.threshold = threshold
        self.probe_every = probe_every
        self._samples: deque[_Sample] = deque(maxlen=window)
        self._degraded = False
        self._requests = 0
        metrics.ROUTING_DEGRADED.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    def route_by_prefix(self) -> bool:
        """Whether this request is routed by prefix: always while predictions hold, else one probe in
        probe_every."""
        if not self._degraded:
            return True
        self._requests += 1
        return self._requests % self.probe_every == 0

    def observe(self, kind: str, worker: str, predicted: int, actual: int) -> None:
        """One request's predicted and reported cached tokens on the worker that computed its prompt."""
        metrics.PREDICTION_GAP.labels(kind).observe(predicted - actual)
        if predicted:
            metrics.FEEDBACK_PREDICTED_TOKENS.labels(kind).inc(predicted)
            metrics.FEEDBACK_REALISED_TOKENS.labels(kind).inc(min(predicted, actual))
        if not predicted and not actual:
            return
        self._samples.append(_Sample(f"{kind} {worker}", predicted, actual))
        rate = _agreement(self._samples)
        metrics.PREDICTION_AGREEMENT.set(rate)
        if len(self._samples) < (self._samples.maxlen or 0):
            return
        if not self._degraded and rate < self.threshold:
            self._degrade(rate)
        elif self._degraded and rate >= self.threshold:
            self._degraded = False
            self._samples.clear()
            metrics.ROUTING_DEGRADED.set(0)
            log.warning("prefix routing resumes: predicted and reported cached tokens agree again (%.2f >= %.2f)",
                        rate, self.threshold)

    def _degrade(self, rate: float) -> None:
        by_worker: dict[str, list[_Sample]] = {}
        for sample in self._samples:
            by_worker.setdefault(sample.worker, []).append(sample)
        worst = sorted(by_worker, key=lambda w: _agreement(by_worker[w]))[:3]
        named = ", ".join(f"{w} ({_agreement(by_worker[w]):.2f}: predicted {sum(s.predicted for s in by_worker[w])}"
                          f", reported {sum(s.actual for s in by_worker[w])} tokens)" for w in worst)
        count = len(self._samples)
        self._degraded = True
        self._requests = 0
        self._samples.clear()       # recovery is judged on fresh requests only
        metrics.ROUTING_DEGRADED.set(1)
        metrics.ROUTING_DEGRADATIONS.labels("prediction_mismatch").inc()
        log.warning("prefix routing degraded: over the last %d requests with cache hits, the prefix index's "
                    "predicted cached tokens agree with what the workers report only %.2f (threshold %.2f); worst: "
                    "%s. Likely cause: %s. Routing by load (one request in %d by prefix, to measure) until they "
                    "agree again.", count, rate, self.threshold, named,
                    LIKELY_CAUSES, self.probe_every)


def _agreement(samples) -> float:
    agreed = sum(min(s.predicted, s.actual) for s in samples)
    total = sum(max(s.predicted, s.actual) for s in samples)
    return agreed / total if total else 1.0
