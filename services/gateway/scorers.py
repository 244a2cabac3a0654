"""What the router weighs, one scorer each, in the style of llm-d's scheduler: every scorer rates a candidate
in [0, 1] and the router picks the highest weighted sum (weights from the gateway's settings).

- device prefix: the share of the prompt the worker's own KV cache holds (no compute, no transfer);
- speculative prefix: the share beyond the worker's cache that a gateway just sent it a request for (a claim
  in the index, not yet confirmed by its events: a burst sharing a new prefix lands on one worker). Weighted
  below a confirmed hit, which is certain, and above the store, since the claimed prefill is most likely done
  (and its blocks cached) by the time the next request's prefill starts;
- store prefix: the share beyond that the kv-store holds (a transfer instead of compute, so weighted lower);
- load: 1 / (1 + sequences on the worker), so an idle worker scores 1 and every queued sequence costs less
  than the one before (a worker holding a long prefix stays worth a short wait).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from splitserve.services.gateway.prefix_index import PrefixHits
from splitserve.services.gateway.workers import Worker


class Scorer(Protocol):
    name: str

    def score(self, worker: Worker, hits: Optional[PrefixHits]) -> float:
        ...


@dataclass(frozen=True)
class DevicePrefixScorer:
    name: str = "device_prefix"

    def score(self, worker: Worker, hits: Optional[PrefixHits]) -> float:
        return _share(hits, lambda h: h.device_tokens(worker.kind, worker.address))


@dataclass(frozen=True)
class SpeculativePrefixScorer:
    name: str = "speculative_prefix"

    def score(self, worker: Worker, hits: Optional[PrefixHits]) -> float:
        return _share(hits, lambda h: h.speculative_tokens(worker.kind, worker.address))


@dataclass(frozen=True)
class StorePrefixScorer:
    name: str = "store_prefix"

    def score(self, worker: Worker, hits: Optional[PrefixHits]) -> float:
        return _share(hits, lambda h: h.store_tokens - h.device_tokens(worker.kind, worker.address))


@dataclass(frozen=True)
class LoadScorer:
    sequences: Callable[[Worker], int]
    name: str = "load"

    def score(self, worker: Worker, hits: Optional[PrefixHits]) -> float:
        return 1.0 / (1 + self.sequences(worker))


def _share(hits: Optional[PrefixHits], tokens: Callable[[PrefixHits], int]) -> float:
    """tokens(hits) as a share of the prompt, in [0, 1]; 0 when the index said nothing."""
    if hits is None or not hits.prompt_tokens:
        return 0.0
    return min(1.0, max(0, tokens(hits)) / hits.prompt_tokens)
