"""Which worker gets a request: least loaded (own in-flight tokens, load reported in Redis), discovery."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import redis as sync_redis
from prometheus_client import REGISTRY

from splitserve.worker_registry import WorkerAnnouncer, WorkerInfo, registry_key


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _reporting(redis_url: str, worker, num_running: int) -> WorkerAnnouncer:
    """Announces decode `worker` with a load of `num_running` sequences."""
    return WorkerAnnouncer(redis_url, "decode", worker.address, "fake-model", lambda: {"num_running": num_running})


@contextlib.contextmanager
def _announcing(stack, *announcers: WorkerAnnouncer):
    """The announcers write their workers to Redis while the body runs."""
    for announcer in announcers:
        stack.loop.run(announcer.start())
    try:
        yield
    finally:
        for announcer in announcers:
            stack.loop.run(announcer.stop())


def test_a_request_goes_to_the_worker_without_one_in_flight(make_stack):
    stack = make_stack(num_decode=2, decode={"token_delay_s": 0.02})
    gateway = stack.start_gateway()
    a, b = (s.servicer for s in stack.decodes)
    before = _sample("splitserve_router_decisions_total", kind="decode", reason="least_loaded")
    with gateway.http_client() as http:
        with http.stream("POST", "/v1/completions",
                         json={"prompt": "x 10", "max_tokens": 200, "stream": True}) as long_running:
            lines = long_running.iter_lines()            # kept: dropping it would close the response
            next(lines)                                  # the first token, from prefill
            stack.wait_for(lambda: a.active or b.active)
            busy, idle = (a, b) if a.active else (b, a)
            assert busy.active == 1 and not idle.active
            for _ in range(3):
                assert http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 2}).status_code == 200
            assert len(busy.requests) == 1 and len(idle.requests) == 3
    assert _sample("splitserve_router_decisions_total", kind="decode", reason="least_loaded") >= before + 3


def test_load_reported_in_redis_steers_requests_away(make_stack, clean_redis):
    stack = make_stack(num_decode=2)
    loaded, free = stack.decodes
    with _announcing(stack, _reporting(clean_redis, loaded, 4), _reporting(clean_redis, free, 0)):
        gateway = stack.start_gateway(redis_url=clean_redis)
        workers = gateway.gateway.pool.workers("decode")
        assert len(workers) == 2 and all(w.reported is not None for w in workers)   # static + announced = one each
        for _ in range(4):
            gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2)
        assert len(loaded.servicer.requests) == 0 and len(free.servicer.requests) == 4


def test_workers_are_discovered_from_redis_and_stale_ones_are_not_used(make_stack, clean_redis):
    stack = make_stack(num_prefill=1, num_decode=2)
    live, stale = stack.decodes
    client = sync_redis.Redis.from_url(clean_redis)
    old = WorkerInfo(stale.address, "decode", "fake-model", time.time() - 60)
    client.hset(registry_key("decode"), old.address, old.to_json())
    live_announcer = WorkerAnnouncer(clean_redis, "decode", live.address, "fake-model", dict, interval_s=0.1)
    prefill_announcer = WorkerAnnouncer(clean_redis, "prefill", stack.prefills[0].address, "fake-model", dict,
                                        interval_s=0.1)
    with _announcing(stack, live_announcer, prefill_announcer), contextlib.closing(client):
        gateway = stack.start_gateway(static_workers=False, redis_url=clean_redis)
        with gateway.http_client() as http:
            assert http.get("/health").status_code == 200
        for _ in range(3):
            result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2)
            assert result.choices[0].text == " w11 w12"
        assert len(live.servicer.requests) == 3 and stale.servicer.requests == []
        assert len(stack.prefill.requests) == 3                   # the discovered prefill worker is used too
        # A worker that leaves the registry leaves the pool.
        stack.loop.run(live_announcer.stop())
        stack.wait_for(lambda: not gateway.gateway.pool.workers("decode"))
        with gateway.http_client() as http:
            assert http.get("/health").status_code == 503


def test_redis_down_keeps_static_workers_serving(stack):
    nowhere = "redis://127.0.0.1:1/0"
    before = _sample("splitserve_gateway_discovery_errors_total")
    gateway = stack.start_gateway(redis_url=nowhere)
    result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2)
    assert result.choices[0].text == " w11 w12"
    assert _sample("splitserve_gateway_discovery_errors_total") > before


def test_failed_prefill_worker_falls_back_to_local_prefill(make_stack):
    stack = make_stack()
    gateway = stack.start_gateway()
    before = _sample("splitserve_gateway_local_prefill_total", reason="no_prefill_worker")
    stack.loop.run(stack.prefills[0].stop())
    result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=3)
    assert result.choices[0].text == " w11 w12 w13"
    assert not stack.decode.requests[0].produced_token_ids
    stack.wait_for(lambda: not gateway.gateway.pool.healthy("prefill"))
    gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=3)
    assert _sample("splitserve_gateway_local_prefill_total", reason="no_prefill_worker") >= before + 1


def test_concurrent_equal_streams_are_balanced_across_decode_workers(make_stack, clean_redis):
    """16 streams at once, one worker still reporting a sequence that has ended (a lagging report): the split
    stays within the router's stated tolerance (one sequence, plus what the worker reports beyond this gateway)."""
    stack = make_stack(num_decode=2, decode={"token_delay_s": 0.02})
    lagging, other = stack.decodes
    with _announcing(stack, _reporting(clean_redis, lagging, 1), _reporting(clean_redis, other, 0)):
        gateway = stack.start_gateway(redis_url=clean_redis)

        async def one(http):
            response = await http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 20})
            assert response.status_code == 200

        async def all_at_once():
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
                await asyncio.gather(*(one(http) for _ in range(16)))

        asyncio.run(all_at_once())
        counts = sorted([len(lagging.servicer.requests), len(other.servicer.requests)])
        assert sum(counts) == 16 and counts[1] - counts[0] <= 2, counts
