"""Prefix-aware routing against a real Redis: a request goes to the worker whose cache holds its prefix, a
lookup is one round trip, and an index that is down or slow costs routing by load (counted), never a request."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import redis.asyncio as aredis
from prometheus_client import REGISTRY

from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_events.events import MEDIUM_DEVICE, MEDIUM_HOST_STORE, BlockStored
from splitserve.kv_events.index import PublisherInfo
from splitserve.kv_events.publisher import KVEventPublisher
from splitserve.services.gateway.prefix_index import PrefixHits, PrefixIndexReader
from splitserve.services.gateway.router import Router
from splitserve.services.gateway.workers import Worker

BLOCK, MODEL = 16, "fake-model-id"
PROMPT = [(7 * i) % 500 + 3 for i in range(12 * BLOCK + 5)]


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _publish(redis_url: str, kind: str, address: str, tokens: list[int], medium: str = MEDIUM_DEVICE):
    info = PublisherInfo(kind, address, medium, BLOCK if medium == MEDIUM_DEVICE else None,
                         MODEL if medium == MEDIUM_DEVICE else None)
    publisher = KVEventPublisher(redis_url, info, heartbeat_s=0.2)
    publisher.publish([BlockStored(tuple(chain_block_hashes(tokens, BLOCK, MODEL)), None, BLOCK, medium)])
    publisher.start()
    return publisher


def _wait(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_requests_go_to_the_prefill_and_decode_workers_holding_their_prefix(make_stack, clean_redis):
    stack = make_stack(num_prefill=2, num_decode=2)
    prefill_holder = stack.prefills[1]
    decode_holder = stack.decodes[0]
    publishers = [_publish(clean_redis, "prefill", prefill_holder.address, PROMPT[:10 * BLOCK]),
                  _publish(clean_redis, "decode", decode_holder.address, PROMPT[:4 * BLOCK])]
    try:
        gateway = stack.start_gateway(redis_url=clean_redis, prefix_index_timeout_s=2.0)
        index = gateway.gateway.prefix_index
        _wait(lambda: (stack.loop.run(index.refresh()), len(index.publishers))[1] == 2)
        before = _sample("splitserve_router_decisions_total", kind="prefill", reason="prefix_hit")
        client = gateway.openai()
        for i in range(4):      # load-only routing would alternate between the two
            client.completions.create(model="fake-model", prompt=PROMPT[:-1] + [i + 1], max_tokens=2)
        assert len(prefill_holder.servicer.requests) == 4 and not stack.prefills[0].servicer.requests
        assert len(decode_holder.servicer.requests) == 4 and not stack.decodes[1].servicer.requests
        assert _sample("splitserve_router_decisions_total", kind="prefill", reason="prefix_hit") == before + 4
        # A prompt nobody holds is spread by load again.
        for i in range(4):
            client.completions.create(model="fake-model", prompt=[9 + i] * 40, max_tokens=2)
        assert len(stack.prefills[0].servicer.requests) == 2
    finally:
        for publisher in publishers:
            publisher.stop()


def test_a_lookup_is_one_round_trip(loop_thread, clean_redis):
    """256 blocks (a 4k-token prompt) and 8 workers holding all of it: one command reaches Redis."""
    prompt = list(range(256 * BLOCK))
    publishers = [_publish(clean_redis, "prefill", f"10.0.0.{i}:1", prompt) for i in range(8)]
    publishers.append(_publish(clean_redis, "kv-store", "10.0.1.1:1", prompt[:100 * BLOCK], MEDIUM_HOST_STORE))

    async def run():
        client = aredis.Redis.from_url(clean_redis)
        reader = PrefixIndexReader(client, timeout_s=5.0)
        await reader.refresh()
        await reader.lookup(prompt)       # loads the script once
        calls = []
        real = client.execute_command

        async def counting(*args, **kwargs):
            calls.append(args[0])
            return await real(*args, **kwargs)

        client.execute_command = counting
        hits = await reader.lookup(prompt)
        await client.aclose()
        return hits, calls

    try:
        _wait(lambda: len(loop_thread.run(_publishers(clean_redis))) == 9)
        hits, calls = loop_thread.run(run())
    finally:
        for publisher in publishers:
            publisher.stop()
    assert calls == ["EVALSHA"]
    # The last prompt token is always computed, so its block is never reused.
    assert all(hits.device_tokens("prefill", f"10.0.0.{i}:1") == 255 * BLOCK for i in range(8))
    assert hits.store_tokens == 100 * BLOCK


async def _publishers(redis_url):
    client = aredis.Redis.from_url(redis_url)
    reader = PrefixIndexReader(client)
    await reader.refresh()
    await client.aclose()
    return reader.publishers


class _SilentServer:
    """Accepts connections and never answers: a Redis that hangs."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.mark.parametrize("failure", ["down", "slow"])
def test_an_unavailable_index_routes_by_load_and_fails_no_request(make_stack, failure):
    stack = make_stack(num_prefill=2, num_decode=2)
    silent = _SilentServer() if failure == "slow" else None
    port = silent.port if silent else _closed_port()
    try:
        gateway = stack.start_gateway(redis_url=f"redis://127.0.0.1:{port}/0", prefix_index_timeout_s=0.05)
        reason = "timeout" if failure == "slow" else "redis_error"
        before = _sample("splitserve_router_load_only_total", reason=reason)
        started = time.monotonic()
        client = gateway.openai()
        for i in range(4):
            client.completions.create(model="fake-model", prompt=PROMPT[:-1] + [i + 1], max_tokens=2)
        assert time.monotonic() - started < 10
        assert _sample("splitserve_router_load_only_total", reason=reason) >= before + 1
        assert _sample("splitserve_router_prefix_index_up") == 0
        assert [len(s.servicer.requests) for s in stack.prefills] == [2, 2]       # spread by load
    finally:
        if silent:
            silent.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_store_scores_below_a_workers_own_cache():
    """The kv-store holding more of the prompt does not outweigh a worker's own cache holding some of it."""
    class Pool:
        def __init__(self, workers):
            self.workers = workers

        def healthy(self, kind):
            return self.workers

    a, b = (Worker(address=f"w{i}", kind="prefill", static=True, channel=None, healthy=True) for i in range(2))
    router = Router(Pool([a, b]))
    hits = PrefixHits(prompt_tokens=1000, device={("prefill", "w1"): 400}, store_tokens=900)
    assert router.pick("prefill", 1000, hits=hits) is b
    b.in_flight_requests = 1               # a sequence queued there: the cache still wins
    assert router.pick("prefill", 1000, hits=hits) is b
    assert asyncio.run(Router(Pool([a, b]), policy="load").prefix_hits([1, 2, 3])) is None


def test_publishers_long_gone_or_malformed_are_forgotten(loop_thread, clean_redis):
    """A crashed publisher's entry is not routed to once it is older than max_age_s, and removed later."""
    import json

    import redis as sync_redis

    from splitserve.kv_events.index import PUBLISHERS_KEY

    client = sync_redis.Redis.from_url(clean_redis)
    fresh = PublisherInfo("prefill", "10.0.0.1:1", MEDIUM_DEVICE, BLOCK, MODEL)
    old = json.loads(fresh.to_json())
    client.hset(PUBLISHERS_KEY, mapping={fresh.id: fresh.to_json(), "prefill|stale": json.dumps(
        {**old, "address": "stale", "updated": time.time() - 30}), "prefill|gone": json.dumps(
        {**old, "address": "gone", "updated": time.time() - 3600}), "prefill|junk": b"{not json"})

    async def refresh():
        async_client = aredis.Redis.from_url(clean_redis)
        reader = PrefixIndexReader(async_client, max_age_s=10, forget_after_s=600)
        await reader.refresh()
        await async_client.aclose()
        return reader.publishers

    assert [p.address for p in loop_thread.run(refresh())] == ["10.0.0.1:1"]
    assert sorted(client.hkeys(PUBLISHERS_KEY)) == [fresh.id.encode(), b"prefill|stale"]
    client.close()


class _Pool:
    def __init__(self, workers):
        self.workers = workers

    def healthy(self, kind):
        return [w for w in self.workers if w.kind == kind]


def test_a_burst_sharing_a_new_prefix_goes_to_one_worker_across_gateways(loop_thread, clean_redis):
    """Two gateway replicas (two Routers, each with its own Redis client and its own view of load) get requests
    with the same prefix before any worker's events say who holds it: the second follows the first's pick, though
    its own view of load would send it elsewhere."""
    publishers = [_publish(clean_redis, "prefill", f"w{i}", [1] * BLOCK) for i in range(2)]

    def router(busy: int):
        workers = [Worker(address=f"w{i}", kind="prefill", static=True, channel=None, healthy=True)
                   for i in range(2)]
        workers[busy].in_flight_requests = 1
        return Router(_Pool(workers), index=PrefixIndexReader(aredis.Redis.from_url(clean_redis), timeout_s=5.0))

    first, second = router(busy=0), router(busy=1)        # by load alone: first picks w1, second picks w0

    async def route(r: Router, prompt):
        await r.index.refresh()
        hits = await r.prefix_hits(prompt)
        return r.pick("prefill", len(prompt), hits=hits).address, hits

    try:
        _wait(lambda: len(loop_thread.run(_publishers(clean_redis))) == 2)
        before = _sample("splitserve_router_decisions_total", kind="prefill", reason="speculative_hit")
        assert loop_thread.run(route(first, PROMPT))[0] == "w1"
        chosen, hits = loop_thread.run(route(second, PROMPT[:-3] + [4, 5, 6]))
        assert chosen == "w1"
        assert hits.speculative_tokens("prefill", "w1") == 12 * BLOCK and not hits.device_tokens("prefill", "w1")
        # Both follow the claim (the first made it in its own lookup).
        assert _sample("splitserve_router_decisions_total", kind="prefill", reason="speculative_hit") == before + 2
        # Another new prompt is still spread by load: the second replica claims and takes w0.
        assert loop_thread.run(route(second, [5] * 100))[0] == "w0"
        # The worker's real events supersede the claim: its blocks count as held, no longer as speculative.
        publishers[1].publish([BlockStored(tuple(chain_block_hashes(PROMPT, BLOCK, MODEL)), None, BLOCK,
                                           MEDIUM_DEVICE)])
        _wait(lambda: loop_thread.run(route(first, PROMPT))[1].device_tokens("prefill", "w1") == 12 * BLOCK)
        assert loop_thread.run(route(first, PROMPT))[1].speculative_tokens("prefill", "w1") == 0
    finally:
        for r in (first, second):
            loop_thread.run(r.index.close())
        for publisher in publishers:
            publisher.stop()


def test_a_pick_that_held_little_of_its_prompt_is_claimed_for_the_next_request(loop_thread, clean_redis):
    """w0 holds one block of a 12-block prompt and gets it; the rest is claimed for w0 after the pick (the
    lookup claims only prompts nobody holds), so a second gateway sends the same prompt to w0 as well."""
    publishers = [_publish(clean_redis, "prefill", "w0", PROMPT[:BLOCK]), _publish(clean_redis, "prefill", "w1", [])]
    workers = [Worker(address=f"w{i}", kind="prefill", static=True, channel=None, healthy=True) for i in range(2)]
    router = Router(_Pool(workers), index=PrefixIndexReader(aredis.Redis.from_url(clean_redis), timeout_s=5.0))

    async def route():
        await router.index.refresh()
        hits = await router.prefix_hits(PROMPT)
        return router.pick("prefill", len(PROMPT), hits=hits).address, hits

    try:
        _wait(lambda: len(loop_thread.run(_publishers(clean_redis))) == 2)
        chosen, hits = loop_thread.run(route())
        assert chosen == "w0" and hits.device_tokens("prefill", "w0") == BLOCK
        _wait(lambda: loop_thread.run(route())[1].speculative_tokens("prefill", "w0") == 11 * BLOCK)
    finally:
        loop_thread.run(router.index.close())
        for publisher in publishers:
            publisher.stop()


def test_predictions_the_workers_contradict_turn_prefix_routing_off_until_they_agree(make_stack, clean_redis,
                                                                                   caplog):
    """The index says prefill 1 holds the prompts' prefix, but it reports no cached tokens (as a worker whose
    hashes differ from those it publishes would): one warning, routing by load, the gap measured; once its
    reports agree again, prefix routing resumes."""
    stack = make_stack(num_prefill=2, num_decode=1)
    holder = stack.prefills[1]
    for server in stack.prefills:
        server.servicer.cached_tokens = 0
    publisher = _publish(clean_redis, "prefill", holder.address, PROMPT)
    predicted = 12 * BLOCK
    try:
        gateway = stack.start_gateway(redis_url=clean_redis, prefix_index_timeout_s=2.0, routing_accuracy_window=4,
                                      routing_accuracy_probe_every=3)
        index = gateway.gateway.prefix_index
        _wait(lambda: (stack.loop.run(index.refresh()), len(index.publishers))[1] == 1)
        gaps = "splitserve_router_prediction_gap_tokens_count", "splitserve_router_prediction_gap_tokens_bucket"
        gaps_before = _sample(gaps[0], kind="prefill"), _sample(gaps[1], kind="prefill", le="64.0")
        degradations = _sample("splitserve_router_routing_degradations_total", reason="prediction_mismatch")
        client = gateway.openai()

        def send(n: int) -> list[int]:
            counts = [len(s.servicer.requests) for s in stack.prefills]
            for i in range(n):
                client.completions.create(model="fake-model", prompt=PROMPT[:-1] + [i + 1], max_tokens=2)
            return [len(s.servicer.requests) - c for s, c in zip(stack.prefills, counts)]

        with caplog.at_level("WARNING", logger="splitserve.services.gateway.routing_accuracy"):
            assert send(4) == [0, 4]                           # by prefix, until the window is full
            # Each request's predicted - reported gap is its 192 predicted tokens (over the 64 bucket).
            assert _sample(gaps[0], kind="prefill") == gaps_before[0] + 4
            assert _sample(gaps[1], kind="prefill", le="64.0") == gaps_before[1]
            assert _sample("splitserve_router_routing_degraded") == 1
            # By load (alternating), but for two probes (1 in 3) by prefix: by prefix alone, all 6 would go to 1.
            assert send(6)[0] == 2
        warnings = [r.getMessage() for r in caplog.records if "prefix routing degraded" in r.getMessage()]
        assert len(warnings) == 1 and holder.address in warnings[0] and "block size" in warnings[0]
        assert _sample("splitserve_router_routing_degradations_total",
                       reason="prediction_mismatch") == degradations + 1
        assert (_sample("splitserve_router_feedback_realised_tokens_total", kind="prefill")
                < _sample("splitserve_router_feedback_predicted_tokens_total", kind="prefill"))

        holder.servicer.cached_tokens = predicted               # the worker fixed: reports agree with the index
        stack.wait_for(lambda: (send(1), _sample("splitserve_router_routing_degraded"))[1] == 0, timeout=30)
        assert send(4) == [0, 4]
        assert _sample("splitserve_router_prediction_agreement") == 1
    finally:
        publisher.stop()


def test_requests_for_prompt_logprobs_are_not_measured_against_the_index(make_stack, clean_redis):
    """A request for prompt logprobs reuses no cached prefix by design (every position needs its logits): the
    0 cached tokens its worker reports are no sign of a wrong index, so lm-eval's loglikelihood requests cannot
    turn prefix routing off. An ordinary request is still measured."""
    stack = make_stack(num_prefill=1, num_decode=1)
    holder = stack.prefills[0]
    holder.servicer.cached_tokens = 0
    publisher = _publish(clean_redis, "prefill", holder.address, PROMPT)
    gaps = "splitserve_router_prediction_gap_tokens_count"
    try:
        gateway = stack.start_gateway(redis_url=clean_redis, prefix_index_timeout_s=2.0, routing_accuracy_window=4)
        index = gateway.gateway.prefix_index
        _wait(lambda: (stack.loop.run(index.refresh()), len(index.publishers))[1] == 1)
        before = _sample(gaps, kind="prefill")
        client = gateway.openai()
        for i in range(5):
            client.completions.create(model="fake-model", prompt=PROMPT[:-1] + [i + 1], max_tokens=2,
                                      extra_body={"prompt_logprobs": 0})
        assert _sample(gaps, kind="prefill") == before
        assert _sample("splitserve_router_routing_degraded") == 0
        client.completions.create(model="fake-model", prompt=PROMPT[:-1] + [9], max_tokens=2)
        assert _sample(gaps, kind="prefill") == before + 1
    finally:
        publisher.stop()
