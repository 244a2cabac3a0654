"""The gateway's view of the Redis prefix index (splitserve.kv_events.index): for one prompt, how many leading
tokens each worker's device cache and the kv-store hold.

A lookup is one round trip per (block size, model id) in use, normally one: the prompt's block chain is hashed
here the way the engines hash it, and the index's lookup script answers every publisher's run at once. The
index is an optimization, never a dependency: a lookup that fails or takes longer than timeout_s returns None
(the router then routes by load), counted by reason and logged once per outage; for retry_s after a failure no
lookup is tried, so an outage costs each request nothing; the first lookup that answers again ends it.
The same round trip claims a new prompt for the workers the router would pick (see kv_events.index), so a burst
sharing a new prefix lands on one worker across gateway replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import redis.asyncio as redis

from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_events.events import MEDIUM_DEVICE
from splitserve.kv_events.index import LOOKUP_LUA, PUBLISHERS_KEY, PublisherInfo, lookup_args
from splitserve.periodic import Periodic
from splitserve.services.gateway import metrics

log = logging.getLogger(__name__)


@dataclass
class PrefixHits:
    """Leading prompt tokens held: per (kind, address) in a worker's device cache (and speculatively beyond it:
    claimed by a gateway's recent pick, not confirmed by the worker's events yet), and in the kv-store. Only
    tokens an engine can reuse count: the last prompt token is always computed, so a prompt ending at a block
    boundary never reuses its last block."""
    prompt_tokens: int
    device: dict[tuple[str, str], int] = field(default_factory=dict)
    store_tokens: int = 0
    speculative: dict[tuple[str, str], int] = field(default_factory=dict)
    prompt: Sequence[int] = ()
    route: bool = True         # False: routing by prefix is degraded (routing_accuracy.py); known, not routed by

    def device_tokens(self, kind: str, address: str) -> int:
        return self.device.get((kind, address), 0)

    def speculative_tokens(self, kind: str, address: str) -> int:
        return self.speculative.get((kind, address), 0)

    def reusable_tokens(self, kind: str, address: str) -> int:
        """The leading tokens the worker would not compute: those its cache holds, and for a prefill worker those
        the kv-store holds beyond that (it reads what its own cache lacks from there; a decode worker does not)."""
        device = self.device_tokens(kind, address)
        return max(device, self.store_tokens) if kind == "prefill" else device


class PrefixIndexReader:
    def __init__(self, redis_client: redis.Redis, timeout_s: float = 0.1, retry_s: float = 1.0,
                 max_age_s: float = 10.0, refresh_s: float = 1.0, forget_after_s: float = 300.0):
        self._redis = redis_client
        self._lookup = redis_client.register_script(LOOKUP_LUA)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_age_s = max_age_s
        self.forget_after_s = forget_after_s
        self._publishers: list[PublisherInfo] = []
        self._refresher = Periodic(self.refresh, refresh_s, name="prefix-index")
        self._retry_at = float("-inf")
        self._outage: Optional[str] = None     # why the index is unavailable (the metric's reason), None if up
        self._claims: set[asyncio.Future] = set()   # claims in flight (a task nobody holds may be collected)
        metrics.PREFIX_INDEX_UP.set(1)

    @property
    def publishers(self) -> list[PublisherInfo]:
        return list(self._publishers)

    async def start(self) -> None:
        await self.refresh()
        self._refresher.start()

    async def close(self) -> None:
        await self._refresher.stop()
        for task in list(self._claims):
            task.cancel()
        await asyncio.gather(*self._claims, return_exceptions=True)

    async def refresh(self) -> None:
        """Re-reads who publishes (and how each hashes); on failure keeps the last list and starts an outage."""
        try:
            entries = await asyncio.wait_for(self._redis.hgetall(PUBLISHERS_KEY), self.timeout_s * 10)
        except (asyncio.TimeoutError, redis.RedisError, OSError) as exc:
            self._failed(exc)
            return
        now = time.time()
        publishers, dead = [], []
        for name, raw in entries.items():
            try:
                info = PublisherInfo.from_json(raw)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("removing a malformed prefix index publisher %r: %s", name, exc)
                dead.append(name)
                continue
            if now - info.updated <= self.max_age_s:
                publishers.append(info)
            elif now - info.updated > self.forget_after_s:
                dead.append(name)    # crashed long ago (its block set has expired): the field alone is left
        self._publishers = publishers
        self._recovered()
        if dead:
            with contextlib.suppress(asyncio.TimeoutError, redis.RedisError, OSError):
                await asyncio.wait_for(self._redis.hdel(PUBLISHERS_KEY, *dead), self.timeout_s * 10)

    async def lookup(self, prompt: Sequence[int],
                     claims: Optional[Mapping[str, str]] = None) -> Optional[PrefixHits]:
        """Who holds how much of the prompt's prefix; None when the index cannot say in time (route by load).
        `claims`: kind -> the address of the worker the router would pick by load; where no worker of that kind
        holds any of the prompt, the index records the prompt as speculatively held by it (in the same round
        trip, atomically), so a request sharing the prefix that arrives before its events do goes there too."""
        if self._outage is not None and (time.monotonic() < self._retry_at or not self._publishers):
            metrics.LOAD_ONLY_ROUTING.labels(self._outage).inc()
            return None
        try:
            hits = await asyncio.wait_for(self._probe(prompt, claims or {}), self.timeout_s)
        except (asyncio.TimeoutError, redis.RedisError, OSError) as exc:
            metrics.LOAD_ONLY_ROUTING.labels(self._failed(exc)).inc()
            return None
        self._recovered()
        return hits

    def claim_later(self, hits: PrefixHits, kind: str, address: str) -> None:
        """Records in the background that the worker was just picked for the prompt (a claim, as lookup()
        makes): for a pick whose known prefix was short, so the next request sharing the rest follows it. Never
        waits: a claim that fails or is late costs only a less precise pick."""
        task = asyncio.ensure_future(self._claim(hits.prompt, kind, address))
        self._claims.add(task)
        task.add_done_callback(self._claims.discard)

    async def _claim(self, prompt: Sequence[int], kind: str, address: str) -> None:
        publisher = next((p for p in self._publishers if p.medium == MEDIUM_DEVICE and p.kind == kind
                          and p.address == address and p.block_size and p.model_id), None)
        if publisher is None:
            return
        chain = chain_block_hashes(prompt, publisher.block_size, publisher.model_id)
        if not chain:
            return
        try:
            await asyncio.wait_for(self._lookup(keys=[], args=lookup_args(chain, [], [publisher.id],
                                                                       claim_below=len(chain) + 1)),
                                   self.timeout_s)
        except (asyncio.TimeoutError, redis.RedisError, OSError) as exc:
            metrics.SPECULATIVE_CLAIM_FAILURES.inc()
            log.debug("claiming a prompt for %s %s failed: %r", kind, address, exc)

    async def _probe(self, prompt: Sequence[int], claims: Mapping[str, str]) -> PrefixHits:
        hits = PrefixHits(len(prompt), prompt=prompt)
        groups: dict[tuple[int, str], list[PublisherInfo]] = defaultdict(list)
        stores = [p for p in self._publishers if p.medium != MEDIUM_DEVICE]
        for p in self._publishers:
            if p.medium == MEDIUM_DEVICE and p.block_size and p.model_id:
                groups[(p.block_size, p.model_id)].append(p)
        if not groups:
            return hits

        async def probe(block_size: int, model_id: str, devices: list[PublisherInfo]) -> None:
            chain = chain_block_hashes(prompt, block_size, model_id)
            if not chain:
                return
            asked = devices + stores
            claimed = [p.id for p in devices if claims.get(p.kind) == p.address]
            answer = await self._lookup(keys=[], args=lookup_args(chain, [p.id for p in asked], claimed))
            usable = (len(prompt) - 1) // block_size
            for p, run, speculative in zip(asked, answer[::2], answer[1::2]):
                confirmed = min(int(run), usable)
                if p.medium == MEDIUM_DEVICE:
                    hits.device[(p.kind, p.address)] = confirmed * block_size
                    hits.speculative[(p.kind, p.address)] = (min(int(run) + int(speculative), usable)
                                                             - confirmed) * block_size
                else:
                    hits.store_tokens = max(hits.store_tokens, confirmed * block_size)

        await asyncio.gather(*(probe(bs, model, devices) for (bs, model), devices in groups.items()))
        return hits

    def _failed(self, exc: BaseException) -> str:
        reason = "timeout" if isinstance(exc, (asyncio.TimeoutError, redis.TimeoutError)) else "redis_error"
        self._retry_at = time.monotonic() + self.retry_s
        if self._outage is None:
            metrics.PREFIX_INDEX_UP.set(0)
            log.warning("prefix index unavailable (%s: %r): routing by load only until it answers again", reason,
                        exc)
        self._outage = reason
        return reason

    def _recovered(self) -> None:
        if self._outage is not None:
            self._outage = None
            metrics.PREFIX_INDEX_UP.set(1)
            log.info("prefix index answering again: routing by prefix resumes")
