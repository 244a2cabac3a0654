"""Two gateway replicas behind Envoy (`splitserve up --gateways 2`), 2 prefill and 2 decode workers, real Redis:
the replicas share the prefix index, so a request sharing a long prefix with an earlier one lands on the
workers holding it whichever gateway each came through (directly, or through Envoy's round robin), and
`cached_tokens` shows the reuse; requests sharing nothing spread over the workers."""

from __future__ import annotations

import concurrent.futures

import pytest

from e2e_stack import (complete, gateway_metric, metric, second_request_goes_to_the_holders,
                       wait_until)
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)
KINDS = ("prefill", "decode")


@pytest.fixture(scope="module")
def replicas(llama_ckpt, tmp_path_factory):
    # Every prompt goes to a prefill worker (--prefill-decider threshold), so both kinds' routing is checked: the
    # predicted choice would prefill a second request on the decode worker that already holds its prefix.
    with Stack(model=str(llama_ckpt), gateways=2, prefill_workers=2, decode_workers=2, tokenizer_replicas=1,
               torch_threads=1, num_kv_blocks=256, log_dir=str(tmp_path_factory.mktemp("replica-logs")), grace_s=3,
               prefill_decider="threshold", extra_args={"gateway": ["--prefix-index-timeout-s", "2"]}) as running:
        for replica in range(2):
            for kind in KINDS:
                wait_until(lambda: gateway_metric(running, f'splitserve_gateway_healthy_workers{{kind="{kind}"}}',
                                                  replica) == 2)
        yield running


def test_a_shared_prefix_lands_on_its_holders_across_gateways(replicas):
    stack = replicas
    gateway_a, gateway_b = stack.gateway_urls
    envoy = stack.base_url
    hits = gateway_metric(stack, 'splitserve_router_decisions_total{kind="prefill",reason="prefix_hit"}')
    # First request through one way, the second through another: each gateway alone, and Envoy, on both sides.
    for k, (first, second) in enumerate([(gateway_a, gateway_b), (gateway_b, envoy), (envoy, gateway_a)]):
        reply = second_request_goes_to_the_holders(stack, 100 + k, first, second, KINDS)
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= 9 * 16, (k, reply["usage"])        # the prefix's blocks (10 of 16 tokens) were reused
    assert gateway_metric(stack, 'splitserve_router_decisions_total{kind="prefill",reason="prefix_hit"}') >= hits + 3


def _served(stack, kind: str) -> list[float]:
    """Requests each worker of `kind` has finished, from its own metrics."""
    name = "splitserve_prefill_requests_total" if kind == "prefill" else "splitserve_decode_requests_total"
    return [metric(port, name) for port in stack.metrics_ports[kind]]


def test_requests_sharing_nothing_spread_over_the_workers(replicas):
    """16 prompts with no common block, 4 at a time, through Envoy and each gateway: each worker of a kind serves
    between a quarter and three quarters of them (an even split is 8 each; the gateways' own counts keep each
    within one sequence, the load the workers report to Redis lags by an announcement interval)."""
    stack = replicas
    urls = [stack.base_url, *stack.gateway_urls]
    prompts = [[200 + i] + [3 + (i * 37 + 11 * j) % 250 for j in range(47)] for i in range(16)]
    before = {kind: _served(stack, kind) for kind in KINDS}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda i: complete(urls[i % 3], prompts[i]).status_code, range(16)))
    assert statuses == [200] * 16
    for kind in KINDS:
        share = [after - b for after, b in zip(_served(stack, kind), before[kind])]
        assert sum(share) == 16 and all(4 <= n <= 12 for n in share), (kind, share)
