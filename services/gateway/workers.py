"""The backends the gateway talks to, and whether each can take work now.

Workers come from flags (static) and, when Redis is configured, from the worker registry (discovered; they
leave the pool when their announcements stop). A worker is healthy after a grpc.health.v1 check answered
SERVING and, where membership_check.py asks for it, after it proved it belongs to the cluster; it is unhealthy
after a check or a request says it is down, until a later check passes (and it proves itself again). A check
that only times out does not take out a worker that is making progress (health_policy.py). The pool also
counts each worker's in-flight requests and tokens as this gateway sent them, which the router reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import grpc
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitserve.periodic import Periodic
from splitserve.serving.grpc_service import insecure_channel
from splitserve.services.gateway import metrics
from splitserve.services.gateway.health_policy import CheckResult, HealthPolicy, Outcome, from_error, from_reply
from splitserve.services.gateway.membership_check import MembershipCheck, NotCheckable, Rejected
from splitserve.worker_registry import KINDS, WorkerInfo, read_workers

log = logging.getLogger(__name__)

# Tokenizer replicas are health-checked like workers; the tokenizer client, not the router, picks one per call.
POOL_KINDS = ("tokenizer", *KINDS)


@dataclass(eq=False)
class Worker:
    address: str
    kind: str
    static: bool
    channel: grpc.aio.Channel = field(repr=False)
    healthy: bool = False
    why_unhealthy: str = "not checked yet"
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    prefill_tokens_in_flight: int = 0              # prompt tokens to compute, sent by this gateway, no first token yet
    reported: Optional[WorkerInfo] = None          # the worker's own load, from the registry
    admitted: bool = False                         # proved it belongs since it was last seen down
    health_channel: Optional[grpc.aio.Channel] = field(default=None, repr=False)  # to its own health thread
    slow_checks: int = 0                           # health checks timed out in a row
    last_progress: float = float("-inf")           # monotonic time of its last sign of life besides health


class WorkerPool:
    def __init__(self, static: dict[str, list[str]], redis_client: Optional[redis.Redis] = None,
                 check_interval_s: float = 1.0, check_timeout_s: float = 1.0, registry_max_age_s: float = 5.0,
                 membership: Optional[MembershipCheck] = None, policy: HealthPolicy = HealthPolicy()):
        unknown = set(static) - set(POOL_KINDS)
        if unknown:
            raise ValueError(f"unknown worker kinds {sorted(unknown)}")
        self._workers: dict[str, dict[str, Worker]] = {kind: {} for kind in POOL_KINDS}
        for kind, addresses in static.items():
            for address in addresses:
                self._add(kind, address, static=True)
        self._redis = redis_client
        self.check_interval_s = check_interval_s
        self.check_timeout_s = check_timeout_s
        self.registry_max_age_s = registry_max_age_s
        self.membership = membership
        self.policy = policy
        self._retired: list[Worker] = []
        self._refresher = Periodic(self._refresh_logged, check_interval_s, name="worker-pool")
        self._discovery_failing = False

    def workers(self, kind: str) -> list[Worker]:
        return list(self._workers[kind].values())

    def healthy(self, kind: str) -> list[Worker]:
        return [w for w in self._workers[kind].values() if w.healthy]

    async def start(self) -> None:
        """One full refresh before returning, so the first request already sees healthy workers."""
        await self.refresh()
        self._refresher.start()

    async def close(self) -> None:
        await self._refresher.stop()
        for worker in [w for kind in self._workers.values() for w in kind.values()] + self._retired:
            await worker.channel.close()
            await self._forget_health_address(worker)

    async def refresh(self) -> None:
        if self._redis is not None:
            await self._discover()
        everyone = [w for kind in self._workers.values() for w in kind.values()]
        await asyncio.gather(*(self._check(w) for w in everyone))
        for kind in POOL_KINDS:
            metrics.HEALTHY_WORKERS.labels(kind).set(len(self.healthy(kind)))
        await self._close_retired()

    def mark_failed(self, worker: Worker, reason: str) -> None:
        """A request to the worker failed in a way that says the worker (not the request) is broken."""
        if worker.healthy:
            log.warning("%s worker %s marked unhealthy: %s", worker.kind, worker.address, reason)
        worker.healthy = False
        worker.why_unhealthy = reason
        worker.admitted = False  # the next check goes to its main port, and it proves itself again
        metrics.HEALTHY_WORKERS.labels(worker.kind).set(len(self.healthy(worker.kind)))

    @staticmethod
    def note_progress(worker: Worker) -> None:
        """The worker just did work for this gateway (a reply, a streamed token): it is alive, if slow."""
        worker.last_progress = time.monotonic()

    @contextlib.contextmanager
    def track(self, worker: Worker, tokens: int) -> Iterator[Worker]:
        worker.in_flight_requests += 1
        worker.in_flight_tokens += tokens
        try:
            yield worker
        finally:
            worker.in_flight_requests -= 1
            worker.in_flight_tokens -= tokens

    @contextlib.contextmanager
    def prefilling(self, worker: Worker, tokens: int) -> Iterator[Worker]:
        """While the worker computes `tokens` of a prompt this gateway sent it (until the first token is back)."""
        worker.prefill_tokens_in_flight += tokens
        try:
            yield worker
        finally:
            worker.prefill_tokens_in_flight -= tokens

    def _add(self, kind: str, address: str, static: bool) -> Worker:
        worker = Worker(address=address, kind=kind, static=static, channel=insecure_channel(address))
        self._workers[kind][address] = worker
        return worker

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh()
        except Exception:  # a bug here must not stop health checking for good
            log.exception("worker pool refresh failed")

    async def _check(self, worker: Worker) -> None:
        # An admitted worker is asked on its health thread, which answers while its event loop is busy; any other
        # on its main port, since a restarted worker's health port is not the one it proved last time.
        channel = worker.health_channel if worker.admitted and worker.health_channel is not None else worker.channel
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.check_timeout_s)
            result = from_reply(reply.status)
        except grpc.aio.AioRpcError as exc:
            result = from_error(exc)
        if result.outcome is Outcome.SLOW:
            metrics.SLOW_HEALTH_CHECKS.labels(worker.kind).inc()
        elif result.outcome is not Outcome.SERVING:
            worker.admitted = False  # whatever answers at this address next proves itself again
            await self._forget_health_address(worker)
        elif not worker.admitted:
            result = await self._admit(worker)
        verdict = self.policy.judge(result, healthy=worker.healthy, slow_checks=worker.slow_checks,
                                    last_progress=worker.last_progress, now=time.monotonic())
        if verdict.healthy and not worker.healthy:
            log.info("%s worker %s is healthy", worker.kind, worker.address)
        elif not verdict.healthy and (worker.healthy or worker.why_unhealthy != verdict.reason):
            log.warning("%s worker %s is unhealthy: %s", worker.kind, worker.address, verdict.reason)
        elif verdict.healthy and verdict.slow_checks == 1:
            log.info("%s worker %s answered no health check within %.1f s; still routed to while it makes "
                     "progress", worker.kind, worker.address, self.check_timeout_s)
        worker.healthy, worker.slow_checks = verdict.healthy, verdict.slow_checks
        worker.why_unhealthy = verdict.reason

    async def _admit(self, worker: Worker) -> CheckResult:
        """SERVING once the worker proved it belongs (or need not), else why not."""
        if self.membership is None or not self.membership.required(worker.kind, worker.static):
            worker.admitted = True
            return CheckResult(Outcome.SERVING)
        try:
            health_address = await self.membership.verify(worker.kind, worker.address, worker.static,
                                                          worker.channel)
        except Rejected as exc:
            metrics.WORKER_REJECTIONS.labels(worker.kind, exc.reason).inc()
            return CheckResult(Outcome.REJECTED, f"not admitted ({exc.reason}): {exc}")
        except NotCheckable as exc:
            return CheckResult(Outcome.REJECTED, f"not admitted yet: {exc}")
        log.info("%s worker %s proved it belongs to the cluster (health checks at %s)", worker.kind,
                 worker.address, health_address or "its main port")
        await self._forget_health_address(worker)
        if health_address:
            worker.health_channel = insecure_channel(health_address)
        worker.admitted = True
        return CheckResult(Outcome.SERVING)

    @staticmethod
    async def _forget_health_address(worker: Worker) -> None:
        if worker.health_channel is not None:
            channel, worker.health_channel = worker.health_channel, None
            await channel.close()

    async def _discover(self) -> None:
        """Adds newly announced workers, drops discovered ones whose announcements stopped, refreshes loads.
        While Redis is unreachable the pool keeps what it knew (health checks still guard it)."""
        found: dict[str, dict[str, WorkerInfo]] = {}
        try:
            for kind in KINDS:
                found[kind] = {w.address: w for w in await read_workers(self._redis, kind, self.registry_max_age_s)}
        except (redis.RedisError, OSError) as exc:
            metrics.DISCOVERY_ERRORS.inc()
            if not self._discovery_failing:
                log.warning("cannot read the worker registry from Redis, keeping the known workers: %s", exc)
            self._discovery_failing = True
            return
        if self._discovery_failing:
            log.info("worker registry readable again")
        self._discovery_failing = False
        for kind in KINDS:
            pool = self._workers[kind]
            for address, info in found[kind].items():
                worker = pool.get(address) or self._add(kind, address, static=False)
                if not worker.static and worker.reported is None:
                    log.info("discovered %s worker %s (model %s)", kind, address, info.model)
                if worker.reported is not None and info.updated > worker.reported.updated:
                    self.note_progress(worker)  # its event loop is turning: a late health answer means busy
                worker.reported = info
            for address, worker in list(pool.items()):
                if address in found[kind]:
                    continue
                worker.reported = None
                if not worker.static:
                    log.info("%s worker %s left the registry; removing it", kind, address)
                    del pool[address]
                    self._retired.append(worker)

    async def _close_retired(self) -> None:
        keep = []
        for worker in self._retired:
            if worker.in_flight_requests:
                keep.append(worker)
            else:
                await worker.channel.close()
                await self._forget_health_address(worker)
        self._retired = keep
