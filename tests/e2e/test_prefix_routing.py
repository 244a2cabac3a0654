"""Prefix-aware routing through the real stack (2 prefill workers, Redis, the engines' KV events): a request
sharing a long prefix with an earlier one goes to the prefill worker whose cache holds it; killing Redis
mid-run routes by load (counted) and fails no request; once Redis is back the publishers resync and prefix
routing resumes; predictions the engines' reports contradict turn prefix routing off until they agree again."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import redis

from e2e_stack import (complete, gateway_metric, held_by_one, prefix_tokens, second_request_goes_to_the_holders,
                       wait_until)
from splitserve.kv_blocks.hashing import chain_block_hashes
from splitserve.kv_events.events import MEDIUM_HOST_STORE, BlockStored
from splitserve.kv_events.index import LOOKUP_LUA, PUBLISHERS_KEY, PublisherInfo, lookup_args
from splitserve.kv_events.publisher import KVEventPublisher
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair_stack(llama_ckpt, tmp_path_factory):
    # Restarts off: the test restarts Redis itself, after requests have run without it. Every prompt is prefilled
    # by a prefill worker (--prefill-decider threshold): the decode worker holds each prefix too once it pulled
    # it, and would otherwise be predicted faster for the second request, leaving prefill routing untested.
    with Stack(model=str(llama_ckpt), prefill_workers=2, decode_workers=1, torch_threads=1, num_kv_blocks=256,
               log_dir=str(tmp_path_factory.mktemp("prefix-logs")), grace_s=3, max_restarts=0,
               prefill_decider="threshold",
               extra_args={"gateway": ["--prefix-index-timeout-s", "2", "--routing-accuracy-window", "4",
                                       "--routing-accuracy-probe-every", "2"]}) as running:
        yield running


def test_a_shared_prefix_goes_to_the_worker_holding_it(pair_stack):
    stack = pair_stack
    wait_until(lambda: gateway_metric(stack, 'splitserve_gateway_healthy_workers{kind="prefill"}') == 2)
    hits = gateway_metric(stack, 'splitserve_router_decisions_total{kind="prefill",reason="prefix_hit"}')
    for k in range(3):      # load-only routing alternates between the two idle workers: 3 in a row is no luck
        second_request_goes_to_the_holders(stack, k, stack.base_url, stack.base_url)
    assert gateway_metric(stack, 'splitserve_router_decisions_total{kind="prefill",reason="prefix_hit"}') >= hits + 3


def test_killing_redis_routes_by_load_and_fails_no_request(pair_stack):
    stack = pair_stack
    load_only = gateway_metric(stack, "splitserve_router_load_only_total")
    stack.process("redis").kill()
    stack.process("redis").wait(10)
    prompts = [prefix_tokens(10 + i) + [i] for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = [r.status_code for r in pool.map(lambda p: complete(stack.base_url, p), prompts)]
    assert statuses == [200] * 8
    assert gateway_metric(stack, "splitserve_router_load_only_total") > load_only
    assert gateway_metric(stack, "splitserve_router_prefix_index_up") == 0

    stack.process("redis").start()          # empty (no persistence): the publishers resync their whole sets
    held_by_one(stack, prefix_tokens(10))
    wait_until(lambda: gateway_metric(stack, "splitserve_router_prefix_index_up") == 1)
    # An empty registry read before the workers announced again drops them from the gateway until they are
    # found and admitted again (worker discovery, not the index): wait until both are routable.
    time.sleep(2)
    wait_until(lambda: gateway_metric(stack, 'splitserve_gateway_healthy_workers{kind="prefill"}') == 2)
    second_request_goes_to_the_holders(stack, 20, stack.base_url, stack.base_url)


def test_predictions_the_workers_contradict_turn_prefix_routing_off_until_they_agree(pair_stack):
    """The accuracy feedback on the real stack: the real index's predictions agree with the cached tokens the
    engines report; a publisher promising blocks nobody can load (a stale index, as events lost or hashes made
    with another block size leave it) makes them disagree: one warning in the gateway's log, routing by load;
    with it gone they agree again and prefix routing resumes."""
    stack = pair_stack
    degraded = "splitserve_router_routing_degraded"
    wait_until(lambda: gateway_metric(stack, 'splitserve_gateway_healthy_workers{kind="prefill"}') == 2)
    predicted = gateway_metric(stack, "splitserve_router_feedback_predicted_tokens_total")
    for k in range(30, 33):
        second_request_goes_to_the_holders(stack, k, stack.base_url, stack.base_url)
    assert gateway_metric(stack, "splitserve_router_feedback_predicted_tokens_total") > predicted
    assert gateway_metric(stack, "splitserve_router_prediction_agreement") >= 0.9
    assert gateway_metric(stack, degraded) == 0

    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2)
    [info] = {(i.block_size, i.model_id) for i in map(PublisherInfo.from_json, client.hgetall(PUBLISHERS_KEY).values())
              if i.kind == "prefill"}
    client.close()
    prompts = [prefix_tokens(40 + i) + [1] for i in range(8)]
    decoy = KVEventPublisher(stack.redis_url, PublisherInfo("kv-store", "10.255.0.1:1", MEDIUM_HOST_STORE, None, None))
    decoy.publish([BlockStored(tuple(h for p in prompts for h in chain_block_hashes(p, *info)), None, None,
                               MEDIUM_HOST_STORE)])
    decoy.start()
    try:
        wait_until(lambda: _store_run(stack, prompts[0], info) >= 10)
        time.sleep(1.5)                                # the gateway's list of publishers now has the decoy
        for prompt in prompts:
            assert complete(stack.base_url, prompt).status_code == 200
        assert gateway_metric(stack, degraded) == 1
        assert gateway_metric(stack, 'splitserve_router_routing_degradations_total{reason="prediction_mismatch"}') == 1
    finally:
        decoy.stop()
    log = (stack.log_dir / "gateway.log").read_text()
    assert log.count("prefix routing degraded") == 1 and "block size" in log

    # Prompts sharing prefixes again, the index exact: a full window in agreement resumes prefix routing.
    for i in range(40):
        assert complete(stack.base_url, prefix_tokens(50 + i % 3) + [i + 1]).status_code == 200
        if gateway_metric(stack, degraded) == 0:
            break
    assert gateway_metric(stack, degraded) == 0
    assert "prefix routing resumes" in (stack.log_dir / "gateway.log").read_text()


def _store_run(stack, tokens, info) -> int:
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2)
    try:
        answer = client.eval(LOOKUP_LUA, 0, *lookup_args(chain_block_hashes(tokens, *info), ["kv-store|10.255.0.1:1"]))
        return int(answer[0])
    finally:
        client.close()
