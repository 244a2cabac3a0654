"""The parts of loadtest/gateway_overhead.py that run without a stack: reading the gateway's overhead histogram
from /metrics, quantiles within buckets as Prometheus computes them, the table and the last line."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import gateway_overhead  # noqa: E402
from serve_load import RequestResult  # noqa: E402

EXPOSITION = """\
# HELP splitserve_gateway_overhead_seconds The gateway's own time
# TYPE splitserve_gateway_overhead_seconds histogram
splitserve_gateway_overhead_seconds_bucket{le="0.001"} 2.0
splitserve_gateway_overhead_seconds_bucket{le="0.002"} 6.0
splitserve_gateway_overhead_seconds_bucket{le="0.004"} 10.0
splitserve_gateway_overhead_seconds_bucket{le="+Inf"} 10.0
splitserve_gateway_overhead_seconds_count 10.0
splitserve_gateway_overhead_seconds_sum 0.02
# HELP splitserve_gateway_prompt_tokens_total Prompt tokens
# TYPE splitserve_gateway_prompt_tokens_total counter
splitserve_gateway_prompt_tokens_total 40.0
"""


def test_buckets_are_read_from_the_exposition_and_differenced():
    after = gateway_overhead.parse_buckets(EXPOSITION)
    assert after == [(0.001, 2.0), (0.002, 6.0), (0.004, 10.0), (math.inf, 10.0)]
    assert gateway_overhead.parse_buckets("# nothing here\n") == []
    before = [(0.001, 1.0), (0.002, 1.0), (0.004, 1.0), (math.inf, 1.0)]
    assert gateway_overhead.bucket_delta(before, after) == [(0.001, 1.0), (0.002, 5.0), (0.004, 9.0),
                                                            (math.inf, 9.0)]
    # A histogram the first scrape did not have yet (no request before): everything is new.
    assert gateway_overhead.bucket_delta([], after) == after


def test_quantiles_interpolate_within_the_bucket_like_prometheus():
    buckets = gateway_overhead.parse_buckets(EXPOSITION)
    # Rank 5 of 10 falls in (1 ms, 2 ms], which holds ranks 3..6: three quarters of the way.
    assert gateway_overhead.histogram_quantile(0.5, buckets) == pytest.approx(0.00175)
    assert gateway_overhead.histogram_quantile(0.1, buckets) == pytest.approx(0.0005)   # from 0 in the first
    assert gateway_overhead.histogram_quantile(1.0, buckets) == pytest.approx(0.004)
    # Beyond the last finite bound: that bound, as Prometheus answers.
    overflow = [(0.001, 1.0), (math.inf, 4.0)]
    assert gateway_overhead.histogram_quantile(0.99, overflow) == 0.001
    assert math.isnan(gateway_overhead.histogram_quantile(0.5, []))
    assert math.isnan(gateway_overhead.histogram_quantile(0.5, [(0.001, 0.0), (math.inf, 0.0)]))


def _phase(name, concurrency, cpu_s, elapsed_s=2.0, overhead=None, failed=0):
    results = [RequestResult(ok=True, latency=0.01 * (i + 1)) for i in range(10 - failed)]
    results += [RequestResult(ok=False, error="HTTP 503") for _ in range(failed)]
    return gateway_overhead.phase_from(name, concurrency, results, elapsed_s,
                                       overhead or gateway_overhead.parse_buckets(EXPOSITION), cpu_s)


def test_rate_cpu_and_the_rate_one_core_sustains():
    phase = _phase("max-rate", 32, cpu_s=0.02, failed=2)
    assert phase.req_per_s == 4.0                        # 8 done in 2 s
    assert phase.cpu_per_request_s == pytest.approx(0.0025)
    assert phase.max_rate_on_one_core == pytest.approx(400.0)
    assert phase.cpu_share == pytest.approx(0.01)
    assert phase.client_p50_s == pytest.approx(0.045)    # median of 10..80 ms


def test_table_summary_and_the_last_line():
    latency, rate = _phase("latency", 1, cpu_s=0.01), _phase("max-rate", 32, cpu_s=1.9)
    lines = gateway_overhead.table([latency, rate]) + gateway_overhead.summary(latency, rate, gateway_cpu=3)
    assert lines[0].split(" | ")[0].strip() == "phase" and len(lines[0].split(" | ")) == len(gateway_overhead.COLUMNS)
    assert lines[1].split(" | ")[6].strip() == "1.75"    # overhead p50 in ms
    assert "core 3" in lines[3] and "the gateway's core was the bottleneck" in lines[4]
    assert "something else bounded" in gateway_overhead.summary(latency, latency, 0)[1]
    assert lines[-1] == "gateway_overhead_p50_ms: 1.75"
    assert gateway_overhead.last_line(0.0123456) == "gateway_overhead_p50_ms: 12.35"


def test_quick_sizes_and_bad_counts(capsys):
    args = gateway_overhead.parse_args(["--quick"])
    assert (args.latency_requests, args.rate_requests, args.concurrency) == (60, 300, 32)
    assert gateway_overhead.parse_args([]).latency_requests == 400
    with pytest.raises(SystemExit):
        gateway_overhead.parse_args(["--concurrency", "0"])
    assert "--concurrency must be >= 1" in capsys.readouterr().err
