"""Prefix-aware routing through the real stack (2 prefill workers, Redis, the engines' KV events): a request
sharing a long prefix with an earlier one goes to the prefill worker whose cache holds it; killing Redis
mid-run routes by load (counted) and fails no request; once Redis is back the publishers resync and prefix
routing resumes."""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from e2e_stack import (complete, gateway_metric, held_by_one, prefix_tokens, second_request_goes_to_the_holders,
                       wait_until)
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair_stack(llama_ckpt, tmp_path_factory):
    # Restarts off: the test restarts Redis itself, after requests have run without it. Every prompt is prefilled
    # by a prefill worker (--prefill-decider threshold): the decode worker holds each prefix too once it pulled
    # it, and would otherwise be predicted faster for the second request, leaving prefill routing untested.
    with Stack(model=str(llama_ckpt), prefill_workers=2, decode_workers=1, torch_threads=1, num_kv_blocks=256,
               log_dir=str(tmp_path_factory.mktemp("prefix-logs")), grace_s=3, max_restarts=0,
               prefill_decider="threshold", extra_args={"gateway": ["--prefix-index-timeout-s", "2"]}) as running:
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
