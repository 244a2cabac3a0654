"""Selective disaggregation: the predicted time to the first token of local vs remote prefill, and the choice.

Unit tests of the estimator (prefill_path.py), then the gateway against fake workers whose announced queues and
rates (real Redis) make one path clearly faster.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import pytest
from prometheus_client import REGISTRY

from splitserve.services.gateway.prefill_path import (LOCAL, REMOTE, PrefillCapacity, PrefillPathChooser, capacity,
                                                      predict_hold_s, predict_local_s, predict_remote_s)
from splitserve.services.gateway.prefix_index import PrefixHits
from splitserve.services.gateway.workers import Worker
from splitserve.worker_registry import WorkerAnnouncer, WorkerInfo

from .test_prefix_routing import BLOCK, PROMPT, _publish, _wait


def _worker(kind: str, address: str, **reported: int) -> Worker:
    worker = Worker(address=address, kind=kind, static=True, channel=None)
    if reported:
        worker.reported = WorkerInfo(address, kind, "m", time.time(), **reported)
    return worker


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the estimator -------------------------------------------------------------------------------------------------

def test_local_time_is_queue_plus_uncached_prompt_over_the_rate():
    decode = PrefillCapacity(queued_tokens=500, tokens_per_s=1000.0)
    assert predict_local_s(1000, cached=500, decode=decode, rate=1000.0) == pytest.approx(1.0)
    # A fully cached prompt still computes its last token.
    assert predict_local_s(1000, cached=1000, decode=PrefillCapacity(0, 1000.0), rate=1000.0) == pytest.approx(0.001)


def test_remote_time_counts_the_better_of_its_cache_and_the_store_and_the_kv_write():
    prefill = PrefillCapacity(queued_tokens=1000, tokens_per_s=2000.0, put_bytes_per_s=1e6, kv_bytes_per_token=1000)
    # 1000 queued + (2000 - max(200, 1000)) computed at 2000 tok/s = 1 s, plus 2000 tokens x 1000 B at 1 MB/s = 2 s.
    assert predict_remote_s(2000, cached=200, store_cached=1000, prefill=prefill, rate=2000.0) == pytest.approx(3.0)
    # No write measured yet: the transfer costs nothing.
    unmeasured = PrefillCapacity(queued_tokens=0, tokens_per_s=2000.0, kv_bytes_per_token=1000)
    assert predict_remote_s(2000, cached=0, store_cached=0, prefill=unmeasured, rate=2000.0) == pytest.approx(1.0)


def test_capacity_adds_what_this_gateway_sent_beyond_the_lagging_report():
    worker = _worker("prefill", "p:1", queued_prompt_tokens=300, prefill_tokens_per_s=900, kv_put_bytes_per_s=5,
                     kv_bytes_per_token=7)
    assert capacity(worker) == PrefillCapacity(300, 900.0, 5.0, 7)
    worker.prefill_tokens_in_flight = 200          # part of the reported 300: not counted twice
    assert capacity(worker).queued_tokens == 300
    worker.prefill_tokens_in_flight = 500          # sent after the report
    assert capacity(worker).queued_tokens == 500
    assert capacity(_worker("decode", "d:1")) == PrefillCapacity(0, None)   # nothing announced


def test_a_cache_hit_waits_for_one_step_of_the_running_batch():
    """A local prefill joins a step of the decode batch: a fully cached prompt's first token takes that step, not
    one token over the prefill rate (predicted 20 ms, measured 35-100 ms before the step was counted)."""
    busy = _worker("decode", "d:1", num_running=8, prefill_tokens_per_s=1000, decode_step_us=40_000)
    assert capacity(busy).step_s == pytest.approx(0.04)
    assert predict_local_s(1000, cached=990, decode=capacity(busy), rate=1000.0) == pytest.approx(0.05)
    # An idle worker has no batch to wait for; a prefill worker (no decode-only steps) announces no step.
    idle = _worker("decode", "d:1", num_running=0, prefill_tokens_per_s=1000, decode_step_us=40_000)
    assert capacity(idle).step_s == 0.0
    prefill = capacity(_worker("prefill", "p:1", num_running=1, prefill_tokens_per_s=1000, decode_step_us=40_000))
    assert predict_remote_s(1000, cached=0, store_cached=0, prefill=prefill, rate=1000.0) == pytest.approx(1.04)


def test_a_local_prefill_holds_every_stream_the_decode_worker_decodes():
    """Each stream decoding there waits while the prompt's uncached tokens are computed."""
    decode = PrefillCapacity(queued_tokens=0, tokens_per_s=1000.0, streams=7)
    assert predict_hold_s(1000, cached=500, decode=decode, rate=1000.0) == pytest.approx(3.5)
    assert predict_hold_s(1000, cached=0, decode=PrefillCapacity(0, 1000.0), rate=1000.0) == 0.0


def test_capacity_counts_a_decode_workers_streams_from_its_report_and_this_gateway():
    worker = _worker("decode", "d:1", num_running=3, prefill_tokens_per_s=1000)
    worker.in_flight_requests = 6                  # this gateway's, the request being placed among them
    assert capacity(worker, choosing_for=1).streams == 5
    worker.in_flight_requests = 2                  # other gateways' streams are in the report only
    assert capacity(worker, choosing_for=1).streams == 3
    prefill = _worker("prefill", "p:1", num_running=3, prefill_tokens_per_s=1000)
    prefill.in_flight_requests = 4
    assert capacity(prefill).streams == 0          # a prefill worker decodes nothing: no stream waits there
    unreported = _worker("decode", "d:2")
    unreported.in_flight_requests = 3
    assert capacity(unreported, choosing_for=1).streams == 2


def test_a_busy_decode_worker_takes_a_prompt_only_when_remote_is_slower_by_its_streams_wait():
    """Equal rates, the prefill worker 0.5 s of queue behind: an idle decode worker takes the prompt (its first
    token comes sooner, and nobody waits for it); with 7 streams decoding, the 7 s they would wait in all
    outweigh the 0.5 s this first token gains, so the prompt goes remote; with a queue longer than that, local."""
    chooser = PrefillPathChooser(hold_weight=1.0)
    decode = _worker("decode", "d:1", prefill_tokens_per_s=1000)
    decode.in_flight_requests = 1                  # the request being placed
    prefill = _worker("prefill", "p:1", prefill_tokens_per_s=1000, queued_prompt_tokens=500)
    assert chooser.choose(1000, decode, prefill, None).path == LOCAL
    decode.in_flight_requests = 8
    choice = chooser.choose(1000, decode, prefill, None)
    assert (choice.path, choice.reason) == (REMOTE, "predicted_faster")
    assert (choice.local_s, choice.hold_s, choice.remote_s) == pytest.approx((1.0, 7.0, 1.5))
    assert "holding its decode streams 7000 ms" in choice.describe()
    backed_up = _worker("prefill", "p:1", prefill_tokens_per_s=1000, queued_prompt_tokens=9000)
    assert chooser.choose(1000, decode, backed_up, None).path == LOCAL        # 10 s vs 1 s + 7 s held
    # The hold weighs what it is told: at 0.25 the 7 s count 1.75 s, still more than the 0.5 s gained.
    assert PrefillPathChooser(hold_weight=0.25).choose(1000, decode, prefill, None).path == REMOTE
    assert PrefillPathChooser(hold_weight=0.0).choose(1000, decode, prefill, None).path == LOCAL
    with pytest.raises(ValueError, match="hold weight"):
        PrefillPathChooser(hold_weight=-1)


def test_a_path_passed_over_by_close_choices_is_probed_to_re_measure_it():
    """A prefill worker whose announced rate is stale-slow (remote predicted 1.5x local) never gets a prompt, so
    it would never re-measure: every probe_every-th close choice takes it anyway, counted as a probe."""
    chooser = PrefillPathChooser(probe_every=4)
    decode = _worker("decode", "d:1", prefill_tokens_per_s=1000)
    stale = _worker("prefill", "p:1", prefill_tokens_per_s=1000, kv_put_bytes_per_s=10**6, kv_bytes_per_token=500)
    choices = [chooser.choose(1000, decode, stale, None) for _ in range(8)]
    assert [(c.path, c.reason) for c in choices] == [(LOCAL, "predicted_faster")] * 3 + [(REMOTE, "probe")] + \
        [(LOCAL, "predicted_faster")] * 3 + [(REMOTE, "probe")]
    assert choices[3].predicted_s == pytest.approx(1.5)         # the probe is checked against the slower estimate
    # Far slower (11 s vs 1 s) is no estimate worth the risk: never probed.
    slow = _worker("prefill", "p:2", prefill_tokens_per_s=1000, kv_put_bytes_per_s=10**5, kv_bytes_per_token=10**3)
    assert {chooser.choose(1000, decode, slow, None).reason for _ in range(8)} == {"predicted_faster"}


def test_cold_start_goes_remote_and_one_measured_side_stands_for_the_other():
    chooser = PrefillPathChooser()
    decode, prefill = _worker("decode", "d:1"), _worker("prefill", "p:1")
    assert (chooser.choose(1000, decode, prefill, None).path, chooser.choose(1000, decode, prefill, None).reason) == \
        (REMOTE, "cold_start")
    # Only the prefill worker measured (the decode worker never prefilled): its rate stands for both, so a
    # queue on it sends the prompt to the idle decode worker.
    prefill = _worker("prefill", "p:1", queued_prompt_tokens=5000, prefill_tokens_per_s=1000)
    choice = chooser.choose(1000, decode, prefill, None)
    assert (choice.path, choice.reason) == (LOCAL, "predicted_faster")
    assert choice.local_s == pytest.approx(1.0) and choice.remote_s == pytest.approx(6.0)


def test_prefix_hits_decide_between_equal_workers():
    chooser = PrefillPathChooser()
    decode = _worker("decode", "d:1", prefill_tokens_per_s=1000)
    prefill = _worker("prefill", "p:1", prefill_tokens_per_s=1000)
    on_decode = PrefixHits(1000, {("decode", "d:1"): 960})
    on_prefill = PrefixHits(1000, {("prefill", "p:1"): 960})
    assert chooser.choose(1000, decode, prefill, on_decode).path == LOCAL
    assert chooser.choose(1000, decode, prefill, on_prefill).path == REMOTE
    assert chooser.choose(1000, decode, prefill, PrefixHits(1000)).path == REMOTE     # a tie stays split


def test_a_slow_kv_write_keeps_the_prompt_local():
    chooser = PrefillPathChooser()
    decode = _worker("decode", "d:1", prefill_tokens_per_s=1000, queued_prompt_tokens=200)
    fast = _worker("prefill", "p:1", prefill_tokens_per_s=1000, kv_put_bytes_per_s=10**9, kv_bytes_per_token=10**3)
    slow = _worker("prefill", "p:2", prefill_tokens_per_s=1000, kv_put_bytes_per_s=10**5, kv_bytes_per_token=10**3)
    assert chooser.choose(1000, decode, fast, None).path == REMOTE          # 1.0 s vs 1.2 s local
    assert chooser.choose(1000, decode, slow, None).path == LOCAL           # 11 s: the write dominates


def test_the_threshold_decider_always_splits_and_bad_deciders_are_refused():
    decode = _worker("decode", "d:1", prefill_tokens_per_s=1000)
    prefill = _worker("prefill", "p:1", prefill_tokens_per_s=1, queued_prompt_tokens=10**6)
    choice = PrefillPathChooser("threshold").choose(1000, decode, prefill, None)
    assert (choice.path, choice.reason) == (REMOTE, "threshold")
    with pytest.raises(ValueError, match="predicted, threshold"):
        PrefillPathChooser("fastest")


# --- the gateway ---------------------------------------------------------------------------------------------------

def _announcing_load(stack, redis_url: str, kind: str, server, **load: int) -> contextlib.AbstractContextManager:
    announcer = WorkerAnnouncer(redis_url, kind, server.address, "fake-model", lambda: load, interval_s=0.2)

    @contextlib.contextmanager
    def running():
        stack.loop.run(announcer.start())
        try:
            yield
        finally:
            stack.loop.run(announcer.stop())

    return running()


@pytest.mark.parametrize("queued_kind, expected_path", [("prefill", LOCAL), ("decode", REMOTE)])
def test_a_queued_worker_pushes_prompts_to_the_other_path(make_stack, clean_redis, queued_kind, expected_path):
    """Both workers measured at 1000 tokens/s; one has 100k prompt tokens queued (100 s), the other none: the
    prompt goes where its first token comes sooner, counted by reason."""
    stack = make_stack()
    queues = {"prefill": 0, "decode": 0, queued_kind: 100_000}
    prefill, decode = stack.prefill, stack.decode
    before = _sample("splitserve_gateway_prefill_path_total", path=expected_path, reason="predicted_faster")
    checked = _sample("splitserve_gateway_prefill_path_ttft_ratio_count", path=expected_path)
    with _announcing_load(stack, clean_redis, "prefill", stack.prefills[0], prefill_tokens_per_s=1000,
                          queued_prompt_tokens=queues["prefill"]), \
            _announcing_load(stack, clean_redis, "decode", stack.decodes[0], prefill_tokens_per_s=1000,
                             queued_prompt_tokens=queues["decode"]):
        gateway = stack.start_gateway(redis_url=clean_redis)
        assert all(w.reported is not None for kind in ("prefill", "decode") for w in gateway.gateway.pool.workers(kind))
        for _ in range(3):
            result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=3)
            assert result.choices[0].text == " w11 w12 w13"                  # the same tokens either way
    remote = [bool(r.produced_token_ids) for r in decode.requests]
    assert remote == [expected_path == REMOTE] * 3
    assert len(prefill.requests) == (3 if expected_path == REMOTE else 0)
    assert _sample("splitserve_gateway_prefill_path_total", path=expected_path, reason="predicted_faster") == before + 3
    # Each first token was checked against the time predicted for its path.
    assert _sample("splitserve_gateway_prefill_path_ttft_ratio_count", path=expected_path) == checked + 3


def test_a_local_prefill_of_a_cached_prefix_queues_only_its_uncached_tokens(make_stack, clean_redis):
    """The decode worker holds 10 of the prompt's 12 full blocks: the prompt stays local, and until its first
    token the gateway counts in the decode worker's queue only the 37 tokens it computes (the worker counts its
    own queue so: the whole prompt would make it look busy for the next choice). The prefill worker proposed for
    the comparison does not get the prompt, and no prefill decision is counted for it."""
    stack = make_stack(decode={"token_delay_s": 1.0})
    publisher = _publish(clean_redis, "decode", stack.decodes[0].address, PROMPT[:10 * BLOCK])
    decisions = sum(_sample("splitserve_router_decisions_total", kind="prefill", reason=reason)
                    for reason in ("only_candidate", "prefix_hit", "least_loaded", "tie", "speculative_hit"))
    try:
        with _announcing_load(stack, clean_redis, "prefill", stack.prefills[0], prefill_tokens_per_s=1000), \
                _announcing_load(stack, clean_redis, "decode", stack.decodes[0], prefill_tokens_per_s=1000):
            gateway = stack.start_gateway(redis_url=clean_redis, prefix_index_timeout_s=2.0)
            index = gateway.gateway.prefix_index
            _wait(lambda: (stack.loop.run(index.refresh()), len(index.publishers))[1] == 1)
            decode = gateway.gateway.pool.workers("decode")[0]
            queued = []
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                reply = pool.submit(gateway.openai().completions.create, model="fake-model", prompt=PROMPT,
                                    max_tokens=2)
                _wait(lambda: stack.decode.active == 1)
                queued.append(decode.prefill_tokens_in_flight)
                assert reply.result().choices[0].text
    finally:
        publisher.stop()
    assert queued == [len(PROMPT) - 10 * BLOCK]
    assert decode.prefill_tokens_in_flight == 0
    assert not stack.prefill.requests and not stack.decode.requests[0].produced_token_ids     # local
    assert sum(_sample("splitserve_router_decisions_total", kind="prefill", reason=reason)
               for reason in ("only_candidate", "prefix_hit", "least_loaded", "tie", "speculative_hit")) == decisions


def test_a_deployment_without_prefill_workers_counts_no_prefill_decision(make_stack):
    """Aggregated (no prefill worker configured): every prompt is prefilled locally as planned, which is no
    router decision (counting it as no_healthy_worker read as an outage)."""
    stack = make_stack(num_prefill=0)
    gateway = stack.start_gateway()
    before = _sample("splitserve_router_decisions_total", kind="prefill", reason="no_healthy_worker")
    local = _sample("splitserve_gateway_prefill_path_total", path=LOCAL, reason="no_prefill_worker")
    assert gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2).choices[0].text
    assert _sample("splitserve_router_decisions_total", kind="prefill", reason="no_healthy_worker") == before
    assert _sample("splitserve_gateway_prefill_path_total", path=LOCAL, reason="no_prefill_worker") == local + 1
