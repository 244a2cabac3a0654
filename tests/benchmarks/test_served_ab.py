"""The parts of benchmarks/served_ab.py that run without a stack: variant flags with their environment, the report."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import served_ab  # noqa: E402


def test_leading_assignments_are_the_variants_environment():
    assert served_ab.split_env("OMP_WAIT_POLICY=PASSIVE A=1 --prefill-workers 0 --x=y") == (
        {"OMP_WAIT_POLICY": "PASSIVE", "A": "1"}, "--prefill-workers 0 --x=y")
    assert served_ab.split_env("") == ({}, "")


def test_report_gives_medians_and_cpu_per_token_by_service():
    def run(tok_s, decode_ms):
        return {"ttft_p50_ms": 100.0, "ttft_p90_ms": 200.0, "itl_tok_p50_ms": 20.0, "itl_p90_ms": 40.0, "output_tok_per_s": tok_s,
                "decode_batch": 4.0, "decode_prefill_tok": 0.0, "failed": 0,
                "cpu_ms_per_tok": {"decode": decode_ms, "gateway": 0.3, "redis-server": 0.01}}

    side = SimpleNamespace(name="agg", rounds={8: [run(100.0, 4.0), run(300.0, 6.0), run(200.0, 5.0)],
                                               1: [run(50.0, 15.0)]})
    text = served_ab.report([side])
    assert "100 300 200" in text and "200.00" in text          # per round, and the median
    assert "c=8 agg: total 5.3; decode 5.00, gateway 0.30" in text
    assert "redis-server" not in text                           # under 0.05 ms per token: left out


def test_no_served_run_repeats_a_prompt_an_earlier_run_sent():
    """A repeated prompt is a prefix-cache hit: rounds must measure new prompts, the same for both sides."""
    import ab_sides

    args = SimpleNamespace(seed=0, quick=True, c8_requests=8, c1_requests=3)
    workloads = ab_sides.ServedWorkloads(args)
    runs = [workloads.warm_up()] + [w for rnd in range(3) for w in workloads.round(rnd).values()]
    prompts = [prompt for run in runs for prompt, _ in run]
    assert len(set(prompts)) == len(prompts) == 4 + 3 * (8 + 3)
    assert ab_sides.ServedWorkloads(args).round(1) == workloads.round(1)   # every side gets the same round
