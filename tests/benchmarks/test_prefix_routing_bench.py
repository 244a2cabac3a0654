"""The parts of loadtest/prefix_routing.py that run without a stack: the multi-tenant workload, the ideal hit
rate, the KV cache sizing, the per-policy numbers, the metrics it reads, the table and the last lines."""

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import prefix_routing  # noqa: E402
from serve_load import RequestResult  # noqa: E402


def _workload(**overrides):
    values = dict(seed=3, tenants=4, system_min=1000, system_max=4000, requests=400, question_min=16,
                  question_max=64, rate=2.0, vocab_size=1000)
    values.update(overrides)
    return prefix_routing.make_workload(**values)


def test_the_workload_is_fixed_by_its_seed_and_within_its_bounds():
    workload = _workload()
    assert workload == _workload() and workload != _workload(seed=4)
    assert len(workload.system_lengths) == 4 and all(1000 <= n <= 4000 for n in workload.system_lengths)
    assert len(workload.requests) == 400
    assert all(16 <= len(r.question) <= 64 for r in workload.requests)
    assert {r.tenant for r in workload.requests} == {0, 1, 2, 3}
    tokens = {t for r in workload.requests for t in r.question}
    assert min(tokens) >= prefix_routing.FIRST_TOKEN_ID and max(tokens) < 1000


def test_arrivals_are_a_poisson_process_at_the_rate():
    arrivals = [r.arrival_s for r in _workload(requests=4000).requests]
    gaps = [b - a for a, b in zip([0.0, *arrivals], arrivals)]
    assert all(gap > 0 for gap in gaps)
    # Exponential gaps: mean 1/rate and standard deviation equal to it (4000 draws: within 5 %).
    assert statistics.fmean(gaps) == pytest.approx(0.5, rel=0.05)
    assert statistics.pstdev(gaps) == pytest.approx(0.5, rel=0.05)


def test_each_phase_has_its_own_system_prompts_of_the_same_lengths():
    workload = _workload(requests=8)
    first, second = prefix_routing.system_prompts(workload, 0), prefix_routing.system_prompts(workload, 1)
    assert first == prefix_routing.system_prompts(workload, 0)
    assert [len(s) for s in first] == [len(s) for s in second] == list(workload.system_lengths)
    assert all(a[:16] != b[:16] for a, b in zip(first, second))     # not even one block in common
    prompts = prefix_routing.prompts(workload, first)
    for request, prompt in zip(workload.requests, prompts):
        assert prompt == first[request.tenant] + list(request.question)


def test_the_ideal_computes_each_system_prompt_once_and_reuses_its_full_blocks():
    workload = prefix_routing.Workload(system_lengths=(1000, 40), requests=tuple(
        prefix_routing.Request(float(i), tenant, (20,) * 10) for i, tenant in enumerate([0, 1, 0, 0, 1])),
        seed=0, vocab_size=1000)
    # 1000 tokens = 62 full blocks of 16 (992 tokens); 40 tokens = 2 full blocks (32).
    assert prefix_routing.ideal_cached_tokens(workload, 16) == [0, 0, 992, 992, 32]


def test_the_default_cache_holds_more_than_one_tenant_share_but_not_every_system_prompt():
    """llm-d's regime: the system prompts need more blocks than one worker's cache, fewer than both together."""
    for quick in (True, False):
        args = prefix_routing.parse_args(["--quick"] if quick else [])
        workload = _workload(seed=args.seed, tenants=args.tenants, requests=args.requests)
        blocks = prefix_routing.default_kv_blocks(workload, 16)
        needed = prefix_routing.system_blocks(workload, 16)
        assert blocks < needed <= prefix_routing.DECODE_WORKERS * blocks
        assert blocks * 16 > max(workload.system_lengths) + 64     # the longest prompt fits
    workload = prefix_routing.Workload(system_lengths=(1000, 40), requests=(
        prefix_routing.Request(0.0, 0, (20,) * 10),), seed=0, vocab_size=1000)
    # 63 + 3 blocks: split over 2 workers plus a quarter is 42; the longest prompt (1010 tokens) needs 65.
    assert prefix_routing.system_blocks(workload, 16) == 66
    assert prefix_routing.default_kv_blocks(workload, 16) == 65
    assert prefix_routing.sizing(workload, 16, 40) == (
        "KV cache per worker: 40 blocks of 16 tokens; the 2 system prompts take 66 blocks: 1.65x one worker's cache, "
        "0.82x the 2 decode workers' caches together")


def _result(prompt, cached, ttft, ok=True):
    return RequestResult(ok=ok, ttft=ttft, output_tokens=8 if ok else 0, prompt_tokens=prompt if ok else 0,
                         cached_tokens=cached, error="" if ok else "HTTP 503")


def test_hit_rates_throughput_and_the_last_line():
    round_robin = prefix_routing.PhaseResult(
        "round-robin", [_result(1000, 0, 2.0), _result(1000, 500, 1.0), _result(1000, 0, 3.0)], 2.0,
        ideal_cached=[0, 992, 992], store_hit_tokens=500, decisions={"round_robin": 3})
    assert round_robin.ttft(0.5) == 2.0 and round_robin.ttft(0.9) == 3.0
    assert round_robin.req_per_s == 1.5 and round_robin.output_tok_per_s == 12.0
    assert round_robin.hit_rate == pytest.approx(500 / 3000)
    assert round_robin.ideal_hit_rate == pytest.approx(1984 / 3000)
    assert round_robin.share_of_ideal == pytest.approx(500 / 1984)
    assert round_robin.store_share == 1.0
    # A failed request counts in neither the hits nor the ideal.
    prefix = prefix_routing.PhaseResult(
        "prefix", [_result(1000, 0, 2.0), _result(1000, 992, 0.2), _result(0, 0, 0.0, ok=False)], 2.0,
        ideal_cached=[0, 992, 992], decisions={"prefix_hit": 1, "least_loaded": 1},
        paths={"local predicted_faster": 1, "remote predicted_faster": 1}, prediction_ratios={"local": 1.5})
    assert prefix.failed == 1 and prefix.share_of_ideal == pytest.approx(1.0)
    # p50 as serve_load takes it (the nearest rank, the lower of two): 0.2 s against 2.0 s.
    assert prefix_routing.last_line(round_robin, prefix) == "ttft_p50_prefix_vs_round_robin: 0.10"
    lines = prefix_routing.table([round_robin, prefix])
    assert [c.strip() for c in lines[0].split(" | ")] == list(prefix_routing.COLUMNS)
    assert [c.strip() for c in lines[1].split(" | ")][:5] == ["round-robin", "3", "0", "2000.00", "3000.00"]
    assert "prefix: prefill worker choices by reason: least_loaded 1, prefix_hit 1" in lines
    assert ("prefix: prefill paths: local predicted_faster 1, remote predicted_faster 1; first token measured / "
            "predicted, mean: local 1.50") in lines
    assert "round-robin: prefill paths: none counted" in lines
    assert "prefix: error: HTTP 503" in lines
    aggregated = prefix_routing.PhaseResult("prefix, aggregated", [_result(1000, 992, 0.4)], 1.0, ideal_cached=[992])
    assert prefix_routing.aggregated_line(prefix, aggregated) == "ttft_p50_disagg_vs_aggregated: 0.50"


def test_metrics_are_read_from_the_exposition():
    text = ('# TYPE splitserve_router_decisions_total counter\n'
            'splitserve_router_decisions_total{kind="prefill",reason="prefix_hit"} 5.0\n'
            'splitserve_router_decisions_total{kind="prefill",reason="least_loaded"} 2.0\n'
            'splitserve_router_decisions_total{kind="decode",reason="prefix_hit"} 7.0\n'
            '# TYPE splitserve_prefill_store_prefix_hit_tokens_total counter\n'
            'splitserve_prefill_store_prefix_hit_tokens_total 320.0\n'
            '# TYPE splitserve_gateway_prefill_path_total counter\n'
            'splitserve_gateway_prefill_path_total{path="local",reason="predicted_faster"} 3.0\n'
            'splitserve_gateway_prefill_path_total{path="remote",reason="cold_start"} 1.0\n'
            'splitserve_gateway_prefill_path_total{path="remote",reason="threshold"} 0.0\n')
    assert prefix_routing.decisions_by_reason(text) == {"prefix_hit": 5.0, "least_loaded": 2.0}
    paths = prefix_routing.paths_by_reason(text)
    assert paths == {"local predicted_faster": 3.0, "remote cold_start": 1.0}
    assert prefix_routing.since({"local predicted_faster": 1.0}, paths) == {"local predicted_faster": 2.0,
                                                                             "remote cold_start": 1.0}
    ratios = ('# TYPE splitserve_gateway_prefill_path_ttft_ratio histogram\n'
              'splitserve_gateway_prefill_path_ttft_ratio_sum{path="local"} %s\n'
              'splitserve_gateway_prefill_path_ttft_ratio_count{path="local"} %s\n')
    # Two more first tokens since, measured at 1.5x and 2.5x their predictions: a mean of 2.
    assert prefix_routing.prediction_ratios(ratios % (1.0, 1.0), ratios % (5.0, 3.0)) == {"local": 2.0}
    assert prefix_routing.sample_sum(text, prefix_routing.STORE_HITS) == 320.0
    assert prefix_routing.sample_sum(text, prefix_routing.DECISIONS, reason="prefix_hit") == 12.0


def test_quick_sizes_and_bad_arguments(capsys):
    quick = prefix_routing.parse_args(["--quick"])
    assert (quick.tenants, quick.requests, quick.rate, quick.system_min, quick.system_max) == (3, 24, 0.5, 1000, 4000)
    full = prefix_routing.parse_args([])
    assert (full.tenants, full.requests, full.rate, full.num_kv_blocks, full.compare_aggregated) == (8, 40, 0.2, None,
                                                                                                 False)
    assert prefix_routing.parse_args(["--num-kv-blocks", "320", "--compare-aggregated"]).compare_aggregated
    assert prefix_routing.MODELS["full"]["num_hidden_layers"] == 8 and prefix_routing.MODELS["full"]["hidden_size"] == 1024
    with pytest.raises(SystemExit):
        prefix_routing.parse_args(["--system-min", "5000"])
    assert "--system-min <= --system-max" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prefix_routing.parse_args(["--num-kv-blocks", "0"])
    assert "--num-kv-blocks must be >= 1" in capsys.readouterr().err
