"""The gateway's view of the Redis prefix index (splitserve.kv_events.index): for one prompt, how many leading
tokens each worker's device cache and the kv-store hold.

A lookup is one round trip per (block size, model id) in use, normally one: the prompt's block chain is hashed
here the way the engines hash it, and the index's lookup script answers every publisher's run at once. The
index is an optimization, never a dependency: a lookup that fails or takes longer than timeout_s returns None
(the router then routes by load), counted by reason and logged once per outage; for retry_s after a failure no
lookup is tried, so an outage costs each request nothing; the first lookup that answers again ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import redis.asyncio as redis

from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_events.events import MEDIUM_DEVICE
from splitserve.kv_events.index import LOOKUP_LUA, PUBLISHERS_KEY, PublisherInfo, lookup_args
from splitserve.periodic import Periodic
from splitserve.services.gateway import metrics

log = logging.getLogger(__name__)


@dataclass
class PrefixHits:
    """Leading prompt tokens held: per (kind, address) in a worker's device cache, and in the kv-store."""
    prompt_tokens: int
    device: dict[tuple[str, str], int] = field(default_factory=dict)
    store_tokens: int = 0

    def device_tokens(self, kind: str, address: str) -> int:
        return self.device.get((kind, address), 0)


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
        metrics.PREFIX_INDEX_UP.set(1)

    @property
    def publishers(self) -> list[PublisherInfo]:
        return list(self._publishers)

    async def start(self) -> None:
        await self.refresh()
        self._refresher.start()

    async def close(self) -> None:
        await self._refresher.stop()

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

    async def lookup(self, prompt: Sequence[int]) -> Optional[PrefixHits]:
        """Who holds how much of the prompt's prefix; None when the index cannot say in time (route by load)."""
        if self._outage is not None and (time.monotonic() < self._retry_at or not self._publishers):
            metrics.LOAD_ONLY_ROUTING.labels(self._outage).inc()
            return None
        try:
            hits = await asyncio.wait_for(self._probe(prompt), self.timeout_s)
        except (asyncio.TimeoutError, redis.RedisError, OSError) as exc:
            metrics.LOAD_ONLY_ROUTING.labels(self._failed(exc)).inc()
            return None
        self._recovered()
        return hits

    async def _probe(self, prompt: Sequence[int]) -> PrefixHits:
        hits = PrefixHits(len(prompt))
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
            runs = await self._lookup(keys=[], args=lookup_args(chain, [p.id for p in asked]))
            for p, run in zip(asked, runs):
                tokens = int(run) * block_size
                if p.medium == MEDIUM_DEVICE:
                    hits.device[(p.kind, p.address)] = tokens
                else:
                    hits.store_tokens = max(hits.store_tokens, tokens)

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
