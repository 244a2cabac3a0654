"""Where one prompt is prefilled: on its decode worker (local) or on a prefill worker (remote, its KV then moved
through the kv-store), whichever adds the least waiting: its own first token's, and a local prefill's hold on
the streams the decode worker is decoding.

Disaggregation is not free: a remote prefill writes the prompt's KV to the kv-store before decode can go on
(the first token leaves before the write; the stream's second token waits for it), and an idle decode worker
holding the prompt's prefix computes the rest faster than a prefill worker that holds nothing or has a queue
(llm-d's P/D guide measured disaggregated TTFT 2.7x aggregated where it split every request). Nor is a local
prefill free: while the decode worker computes the prompt, every stream it decodes waits for its next token.
Choosing by the first token alone sent the decode worker 78 % of the prompt tokens at c=8 on 2 cores, which then
ran it at full load while the prefill worker idled 80 % of the time. So for each prompt (deciders, the gateway's
--prefill-decider):

- `predicted` (default): estimate both first-token times, and the hold,
      local  = decode's step + (decode queue + prompt - decode's cached prefix) / decode's prefill rate
      hold   = streams decoding there x (prompt - decode's cached prefix) / decode's prefill rate
      remote = prefill's step + (prefill queue + prompt - max(prefill's cached prefix, kv-store's)) / its rate
               + prompt x KV bytes/token / prefill's write rate (each block is read from the store or written;
                 the write delays the stream's second token rather than its first, a cost of the path all the same)
  and take local when local + w x hold < remote, w the hold weight (--prefill-hold-weight). An idle decode
  worker holds nobody up (the choice is the faster first token, as at c=1); a busy one takes a prompt only
  when the remote path is slower by more than w x the time its streams would wait. w trades the first token
  against the streams' tokens (2 cores, c=8, new prompts, benchmarks/served_ab.py, medians of 3 rounds: w=0
  TTFT p50 263 ms, ITL/token 43 ms, 163 tok/s; w=0.25 275 ms, 29 ms, 213 tok/s; w=0.5 358 ms, 27 ms, 211;
  w=1 595 ms, 22 ms, 208): 0.25, the default, keeps the first token as fast and holds the streams a third less.
  A worker's step is the time of one of its decode-only steps while it runs a batch (0 when idle): a prompt
  joins a step of the running batch, a fixed cost a cache hit's few tokens over the rate miss.
  Its streams are the most of what it announced running and what this gateway has on it besides this prompt.
  Queues are prompt tokens waiting on the worker to be computed: what it announced to Redis beyond what this
  gateway sent it (as the router counts load), plus what this gateway's own prompts still waiting for their
  first token will compute there (their uncached part, as the worker counts them). Rates are
  what each worker measures itself and announces (engine steps and kv-store writes; see WorkerInfo), not what
  the gateway times: a gateway sees only its own share of a worker's requests, and its timings of a prefill
  hold the queue and the KV write, which the formula counts apart. A worker with no measured rate yet takes
  the other one's (both run the same model); with neither measured (cold start) the prompt goes remote, the
  deployment's design, which also measures the prefill workers; an unmeasured write rate costs nothing.
  The decode worker's own read of the KV comes after the first token and is not counted.
  A path that keeps losing never re-measures its worker's rates, so an estimate too slow would stand forever:
  each `probe_every`-th close choice (the slower path's cost within `probe_gap` of the faster's) passing over
  the same worker takes the slower path instead, counted with reason `probe`.
- `threshold`: remote always (the static rule of before: only the threshold below keeps prompts local).

Either way prompts shorter than --local-prefill-threshold always stay local (an override, decided before this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from splitserve.services.gateway.prefix_index import PrefixHits
from splitserve.services.gateway.workers import Worker

DECIDERS = ("predicted", "threshold")
DEFAULT_HOLD_WEIGHT = 0.25
LOCAL, REMOTE = "local", "remote"


@dataclass(frozen=True)
class PathChoice:
    path: str                          # LOCAL or REMOTE
    reason: str                        # the metric's label: predicted_faster, probe, cold_start, threshold
    local_s: Optional[float] = None    # the predicted times to the first token, when predicted
    remote_s: Optional[float] = None
    hold_s: float = 0.0                # predicted: the decode worker's streams' total wait for a local prefill

    @property
    def predicted_s(self) -> Optional[float]:
        """The predicted time to the first token of the chosen path (None: not predicted)."""
        return self.local_s if self.path == LOCAL else self.remote_s

    def describe(self) -> str:
        if self.local_s is None or self.remote_s is None:
            return f"{self.path} prefill ({self.reason})"
        return (f"{self.path} prefill ({self.reason}: predicted first token local {self.local_s * 1000:.0f} ms "
                f"holding its decode streams {self.hold_s * 1000:.0f} ms in all, remote {self.remote_s * 1000:.0f} ms)")


@dataclass(frozen=True)
class PrefillCapacity:
    """What predicting a prefill on one worker needs of it."""
    queued_tokens: int
    tokens_per_s: Optional[float]                  # None: not measured yet
    put_bytes_per_s: Optional[float] = None
    kv_bytes_per_token: int = 0
    step_s: float = 0.0                            # a step of the batch it runs, which a prompt there joins
    streams: int = 0                               # sequences it decodes, each held up by a prompt it computes


def _uncached(prompt_tokens: int, reused: int) -> int:
    return max(1, prompt_tokens - reused)   # the last token is always computed: its logits are the first token


def computed_tokens(prompt_tokens: int, worker: Worker, hits: Optional[PrefixHits]) -> int:
    """The prompt tokens `worker` is predicted to compute, what it counts in its announced queue: a prompt whose
    prefix it reuses adds only the rest (counting the whole prompt made a worker busy with cached prompts look
    queued for seconds, and sent the next prompt the other way)."""
    return _uncached(prompt_tokens, hits.reusable_tokens(worker.kind, worker.address) if hits is not None else 0)


def capacity(worker: Worker, choosing_for: int = 0) -> PrefillCapacity:
    """The worker's announced queue and rates, with this gateway's own prompts that have no first token yet, and
    its streams: of what it announced and what this gateway has on it besides the `choosing_for` requests being
    placed (a decode worker counts the request from its pick), the more."""
    own = worker.prefill_tokens_in_flight
    info = worker.reported
    streams = 0
    if worker.kind == "decode":   # a prefill worker decodes nothing: no stream waits there
        streams = max(worker.in_flight_requests - choosing_for, info.num_running if info is not None else 0, 0)
    if info is None:
        return PrefillCapacity(own, None, streams=streams)
    step_s = info.decode_step_us / 1e6 if info.num_running else 0.0
    return PrefillCapacity(own + max(0, info.queued_prompt_tokens - own), info.prefill_tokens_per_s or None,
                           info.kv_put_bytes_per_s or None, info.kv_bytes_per_token, step_s, streams)


def _prefill_s(computed: int, worker: PrefillCapacity, rate: float) -> float:
    """Its queue and `computed` tokens at `rate`, after one step of the batch the worker runs."""
    return worker.step_s + (worker.queued_tokens + computed) / rate


def predict_local_s(prompt_tokens: int, cached: int, decode: PrefillCapacity, rate: float) -> float:
    return _prefill_s(_uncached(prompt_tokens, cached), decode, rate)


def predict_hold_s(prompt_tokens: int, cached: int, decode: PrefillCapacity, rate: float) -> float:
    """The streams' total wait while the decode worker computes the prompt: each one's next token is that late."""
    return decode.streams * _uncached(prompt_tokens, cached) / rate


def predict_remote_s(prompt_tokens: int, cached: int, store_cached: int, prefill: PrefillCapacity,
                     rate: float) -> float:
    computed = _uncached(prompt_tokens, max(cached, store_cached))
    transfer_s = 0.0
    if prefill.put_bytes_per_s and prefill.kv_bytes_per_token:
        # The store's part of the prefix is read from it and the rest written to it: every prompt token moves once.
        transfer_s = prompt_tokens * prefill.kv_bytes_per_token / prefill.put_bytes_per_s
    return _prefill_s(computed, prefill, rate) + transfer_s


class PrefillPathChooser:
    def __init__(self, decider: str = "predicted", probe_every: int = 16, probe_gap: float = 2.0,
                 hold_weight: float = DEFAULT_HOLD_WEIGHT):
        """A probe costs at most `probe_gap` times the faster path's predicted cost, once in `probe_every` close
        choices per worker passed over. `hold_weight`: what a second of a decoding stream's wait counts for
        against a second of the new prompt's first token (0: the first token alone)."""
        if decider not in DECIDERS:
            raise ValueError(f"prefill decider must be one of {', '.join(DECIDERS)}, got {decider!r}")
        if not hold_weight >= 0:
            raise ValueError(f"prefill hold weight must be >= 0, got {hold_weight!r}")
        self.decider = decider
        self.hold_weight = hold_weight
        self.probe_every = probe_every
        self.probe_gap = probe_gap
        self._passed_over: dict[tuple[str, str], int] = {}   # (kind, address) -> close choices since it was taken

    def choose(self, prompt_tokens: int, decode: Worker, prefill: Worker, hits: Optional[PrefixHits]) -> PathChoice:
        if self.decider == "threshold":
            return PathChoice(REMOTE, "threshold")
        local, remote = capacity(decode, choosing_for=1), capacity(prefill)
        local_rate = local.tokens_per_s or remote.tokens_per_s
        remote_rate = remote.tokens_per_s or local.tokens_per_s
        if local_rate is None or remote_rate is None:
            return PathChoice(REMOTE, "cold_start")
        hits = hits or PrefixHits(prompt_tokens)
        on_decode = hits.device_tokens(decode.kind, decode.address)
        local_s = predict_local_s(prompt_tokens, on_decode, local, local_rate)
        hold_s = predict_hold_s(prompt_tokens, on_decode, local, local_rate)
        remote_s = predict_remote_s(prompt_tokens, hits.device_tokens(prefill.kind, prefill.address),
                                    hits.store_tokens, remote, remote_rate)
        local_cost = local_s + self.hold_weight * hold_s
        # Ties go remote: the split keeps the decode worker's batch free for the streams it is decoding.
        path = LOCAL if local_cost < remote_s else REMOTE
        reason = "predicted_faster"
        if max(local_cost, remote_s) <= self.probe_gap * min(local_cost, remote_s) and self._probe(
                prefill if path == LOCAL else decode):
            path, reason = (REMOTE if path == LOCAL else LOCAL), "probe"
        taken = decode if path == LOCAL else prefill
        self._passed_over.pop((taken.kind, taken.address), None)
        return PathChoice(path, reason, local_s, remote_s, hold_s)

    def _probe(self, passed_over: Worker) -> bool:
        """Whether this close choice, which would pass over `passed_over` again, is its turn to be re-measured."""
        key = (passed_over.kind, passed_over.address)
        self._passed_over[key] = self._passed_over.get(key, 0) + 1
        return self._passed_over[key] >= self.probe_every
