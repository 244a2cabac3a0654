"""Prefill and decode workers announce themselves and their load in Redis; gateways read the list to discover them.

One Redis hash per kind, `splitserve:workers:{kind}`: field = the worker's gRPC address, value = JSON with the
worker's model and load and the time it was written. Workers rewrite their entry every `interval_s`; readers
ignore entries older than `max_age_s`, so a worker that died without cleaning up drops out on its own.

A worker must keep serving when Redis is down: announcer errors are logged (at most once per interval of
`_LOG_EVERY_S`) and counted, never raised into the worker.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Mapping, Union

import redis.asyncio as redis
from prometheus_client import Counter

from splitserve.periodic import Periodic

log = logging.getLogger(__name__)

KINDS = ("prefill", "decode")
_LOG_EVERY_S = 30.0
# A hash whose workers all died is removed by Redis after this many announce intervals.
_KEY_TTL_INTERVALS = 30

REGISTRY_ERRORS = Counter("splitserve_worker_registry_errors_total",
                          "Redis errors while announcing or reading workers", ["kind", "op"])

LoadFn = Callable[[], Union[Mapping[str, int], Awaitable[Mapping[str, int]]]]


def registry_key(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"worker kind must be one of {KINDS}, got {kind!r}")
    return f"splitserve:workers:{kind}"


@dataclass(frozen=True)
class WorkerInfo:
    address: str
    kind: str
    model: str
    updated: float                        # unix seconds of the last announcement
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    # What the gateway predicts a prefill's time from (services/gateway/prefill_path.py); 0: not measured yet.
    queued_prompt_tokens: int = 0         # prompt tokens waiting to be computed
    prefill_tokens_per_s: int = 0         # measured over its recent prefill steps
    kv_put_bytes_per_s: int = 0           # measured over its recent KV writes to the kv-store
    kv_bytes_per_token: int = 0           # KV of one token, all layers
    decode_step_us: int = 0               # measured over its recent steps that only decoded

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: Union[str, bytes]) -> "WorkerInfo":
        data = json.loads(raw)
        return cls(address=str(data["address"]), kind=str(data["kind"]), model=str(data.get("model", "")),
                   updated=float(data["updated"]), **{name: int(data.get(name, 0)) for name in _LOAD_FIELDS})


_LOAD_FIELDS = ("num_running", "num_waiting", "kv_blocks_free", "kv_blocks_total", "queued_prompt_tokens",
                "prefill_tokens_per_s", "kv_put_bytes_per_s", "kv_bytes_per_token", "decode_step_us")


class _RateLimitedLog:
    def __init__(self) -> None:
        self._last = float("-inf")

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= _LOG_EVERY_S:
            self._last = now
            log.warning(message, *args)


class WorkerAnnouncer:
    """Keeps one worker's entry fresh in Redis until stopped; removes it on stop."""

    def __init__(self, redis_url: str, kind: str, address: str, model: str, load_fn: LoadFn,
                 interval_s: float = 1.0):
        self.key = registry_key(kind)
        self.kind = kind
        self.address = address
        self.model = model
        self.load_fn = load_fn
        self.interval_s = interval_s
        self._redis = redis.from_url(redis_url, socket_timeout=max(interval_s, 1.0),
                                     socket_connect_timeout=max(interval_s, 1.0))
        self._announcer = Periodic(self.announce_once, interval_s, name=f"announce-{kind}-{address}")
        self._errors = _RateLimitedLog()

    async def start(self) -> None:
        """Announces once right away (so discovery does not wait an interval), then every interval_s."""
        await self.announce_once()
        self._announcer.start()

    async def stop(self) -> None:
        await self._announcer.stop()
        try:
            await self._redis.hdel(self.key, self.address)
        except (redis.RedisError, OSError) as exc:
            REGISTRY_ERRORS.labels(self.kind, "remove").inc()
            log.warning("could not remove %s worker %s from Redis: %s", self.kind, self.address, exc)
        await self._redis.aclose()

    async def announce_once(self) -> bool:
        """Writes the entry; False (counted and logged) when the load or Redis failed."""
        try:
            load = self.load_fn()
            if inspect.isawaitable(load):
                load = await load
            numbers = {name: int(load.get(name, 0)) for name in _LOAD_FIELDS}
        except Exception as exc:  # the worker's own stats must not stop it from being found
            REGISTRY_ERRORS.labels(self.kind, "load").inc()
            self._errors.warning("%s worker %s: load_fn failed, not announcing: %r", self.kind, self.address, exc)
            return False
        info = WorkerInfo(address=self.address, kind=self.kind, model=self.model, updated=time.time(), **numbers)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self.key, self.address, info.to_json())
                pipe.expire(self.key, max(1, int(self.interval_s * _KEY_TTL_INTERVALS)))
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            REGISTRY_ERRORS.labels(self.kind, "announce").inc()
            self._errors.warning("%s worker %s: cannot announce to Redis: %s", self.kind, self.address, exc)
            return False
        return True


async def read_workers(redis_client: redis.Redis, kind: str, max_age_s: float = 5.0) -> list[WorkerInfo]:
    """The workers of `kind` announced within max_age_s, sorted by address. Redis errors propagate (the caller
    decides how to degrade); malformed entries are skipped and counted."""
    entries = await redis_client.hgetall(registry_key(kind))
    now = time.time()
    workers = []
    for field, raw in entries.items():
        try:
            info = WorkerInfo.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            REGISTRY_ERRORS.labels(kind, "malformed").inc()
            log.warning("ignoring malformed %s worker entry %r: %s", kind, field, exc)
            continue
        if now - info.updated <= max_age_s:
            workers.append(info)
    return sorted(workers, key=lambda w: w.address)
