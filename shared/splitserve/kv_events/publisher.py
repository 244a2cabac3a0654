"""Publishes one worker's (or the kv-store's) KV events to the Redis index from a thread of its own.

publish() is called once per engine step with that step's events and never blocks it: it updates the
publisher's own copy of its set, gives the batch the next sequence number and queues it. A thread sends the
queue through the index's apply script. When the queue is full the batch is dropped and counted, and the thread
sends a snapshot (the whole copy, at the latest sequence number) instead of the missing deltas; so does it when
the index answers that a batch does not follow (a gap, another epoch, state lost with a Redis restart) or Redis
failed mid-send. The epoch is new for each publisher start, so a restarted worker's first batch replaces
whatever its previous life left.

Between batches the thread sends a heartbeat every heartbeat_s, which renews the entries' TTL (ttl_s) and finds
out whether the index still holds this epoch's state.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import redis
from prometheus_client import Counter

from splitserve.kv_events.events import KVEvent, apply_to, encode_ops
from splitserve.kv_events.index import (APPLY_LUA, MODE_DELTA, MODE_HEARTBEAT, MODE_SNAPSHOT, PUBLISHERS_KEY,
                                        PublisherInfo, apply_args, set_key, speculative_key, state_key)
from splitserve.kv_blocks.hashing import BlockHash

log = logging.getLogger(__name__)

BATCHES_DROPPED = Counter("splitserve_kv_events_dropped_batches_total",
                          "KV event batches dropped because the publish queue was full (a snapshot follows)",
                          ["kind"])
RESYNCS = Counter("splitserve_kv_events_resyncs_total",
                  "Snapshots of a publisher's whole block set sent to the index, by reason", ["kind", "reason"])
PUBLISH_ERRORS = Counter("splitserve_kv_events_publish_errors_total",
                         "Redis errors while sending KV events (the next send is a snapshot)", ["kind"])
_LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class _Batch:
    seq: int
    ops: bytes


def new_epoch() -> str:
    return f"{time.time_ns():x}-{os.urandom(4).hex()}"


class KVEventPublisher:
    def __init__(self, redis_url: str, info: PublisherInfo, max_queue: int = 256, heartbeat_s: float = 1.0,
                 ttl_s: float = 10.0):
        self.info = info
        self.epoch = new_epoch()
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        timeout = max(heartbeat_s, 1.0)
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._apply = self._redis.register_script(APPLY_LUA)
        self._lock = threading.Lock()         # guards _held and _seq: publish() runs on the engine's thread
        self._held: set[BlockHash] = set()
        self._seq = 0
        self._queue: queue.Queue[_Batch] = queue.Queue(maxsize=max_queue)
        # Why the next send must be a snapshot (None: deltas follow), and a count of such requests, so a request
        # made while a snapshot is on its way (a batch dropped after the copy) asks for another one.
        self._resync: Optional[str] = "start"
        self._resync_requests = 0
        self._sent_seq = -1
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_warning = float("-inf")

    @property
    def kind(self) -> str:
        return self.info.kind

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{self.info.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the thread and removes this publisher's entries (best effort: they expire anyway)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.delete(set_key(self.info.id), state_key(self.info.id), speculative_key(self.info.id))
            pipe.hdel(PUBLISHERS_KEY, self.info.id)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.info("could not remove the KV index entries of %s: %s", self.info.id, exc)
        self._redis.close()

    def publish(self, events: Sequence[KVEvent]) -> None:
        """Queues one step's events; never blocks. Any thread."""
        if not events:
            return
        ops = encode_ops(events)
        with self._lock:
            apply_to(self._held, events)
            self._seq += 1
            batch = _Batch(self._seq, ops)
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            BATCHES_DROPPED.labels(self.kind).inc()
            self._need_resync("queue_full")

    def held(self) -> set[BlockHash]:
        with self._lock:
            return set(self._held)

    def _need_resync(self, reason: str) -> None:
        with self._lock:
            self._resync_requests += 1
            if self._resync is None:
                self._resync = reason

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._resync is not None:
                    self._send_snapshot()
                    continue
                try:
                    batch = self._queue.get(timeout=self.heartbeat_s)
                except queue.Empty:
                    if not self._send(MODE_HEARTBEAT, self._sent_seq, b""):
                        self._need_resync("state_lost")
                    continue
                if batch.seq <= self._sent_seq:
                    continue                     # already in a snapshot
                if self._send(MODE_DELTA, batch.seq, batch.ops):
                    self._sent_seq = batch.seq
                else:
                    self._need_resync("gap")
            except (redis.RedisError, OSError) as exc:
                PUBLISH_ERRORS.labels(self.kind).inc()
                self._need_resync("redis_error")
                self._warn("cannot publish KV events of %s to Redis: %s", self.info.id, exc)
                self._stopping.wait(self.heartbeat_s)

    def _send_snapshot(self) -> None:
        with self._lock:
            held, seq, reason, requests = list(self._held), self._seq, self._resync, self._resync_requests
        self._send(MODE_SNAPSHOT, seq, b"".join(b"S" + h for h in held))
        self._sent_seq = seq
        with self._lock:
            if self._resync_requests == requests:
                self._resync = None
        RESYNCS.labels(self.kind, reason).inc()
        if reason != "start":
            log.info("KV index: sent %s's %d blocks as a snapshot at seq %d (%s)", self.info.id, len(held), seq,
                     reason)

    def _send(self, mode: str, seq: int, ops: bytes) -> bool:
        keys, args = apply_args(self.info, self.epoch, seq, mode, ops, self.ttl_s)
        return bool(self._apply(keys=keys, args=args))

    def _warn(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _LOG_EVERY_S:
            self._last_warning = now
            log.warning(message, *args)
