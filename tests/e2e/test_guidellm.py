"""GuideLLM 0.8, a benchmark tool nobody here wrote, against the stack the launcher starts: a bounded run of
synthetic prompts (tokenized with the checkpoint's own tokenizer folder, offline) completes with no error, and
its JSON report counts every request as successful with the tokens asked for.

GuideLLM runs as its CLI (`guidellm run` with a scenario file), in its own process, as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from e2e_stack import API_KEY, gateway_metric

pytestmark = pytest.mark.timeout(300)

REQUESTS = 6
PROMPT_TOKENS = 32
OUTPUT_TOKENS = 8


def _run_guidellm(tmp_path, stack, model: str, ckpt, request_format: str, stream: bool) -> dict:
    """GuideLLM's report (the JSON output) of one bounded run at concurrency 2."""
    report = tmp_path / "report.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": stack.http_url, "model": model, "api_key": API_KEY,
                    "request_format": request_format, "stream": stream, "timeout": 120, "timeout_connect": 30},
        "profile": {"kind": "concurrent", "streams": [2]},
        "constraints": [{"kind": "max_requests", "count": REQUESTS}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(ckpt)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}],
        "seed": {"kind": "static", "value": 7},
        "outputs": [{"kind": "json", "path": str(report)}],
    }}
    scenario_path = tmp_path / "scenario.yaml"
    scenario_path.write_text(yaml.safe_dump(scenario))
    # No network: the tokenizer comes from the checkpoint folder, never from the hub.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "guidellm", "run", "--scenario", str(scenario_path),
                          "--disable-console-interactive"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, f"guidellm failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(report.read_text())


@pytest.mark.parametrize("request_format,stream", [("/v1/completions", True), ("/v1/chat/completions", False)])
def test_a_bounded_guidellm_run_completes_without_errors(tmp_path, stack, llama_ckpt, request_format, stream):
    endpoint = "completions" if request_format == "/v1/completions" else "chat_completions"
    served_before = gateway_metric(stack, f'splitserve_gateway_requests_total{{endpoint="{endpoint}",status="200"}}')

    report = _run_guidellm(tmp_path, stack, llama_ckpt.name, llama_ckpt, request_format, stream)

    [benchmark] = report["benchmarks"]
    unsuccessful = [(kind, (r.get("info") or {}).get("error")) for kind in ("errored", "incomplete")
                    for r in benchmark["requests"][kind] or ()]
    assert benchmark["metrics"]["request_totals"] == {"successful": REQUESTS, "errored": 0, "incomplete": 0,
                                                       "total": REQUESTS}, unsuccessful
    assert benchmark["scheduler_metrics"]["requests_made"]["successful"] == REQUESTS
    successful = benchmark["requests"]["successful"]
    assert len(successful) == REQUESTS and not benchmark["requests"]["errored"]
    # GuideLLM asks for ignore_eos, so every request yields exactly the tokens asked for, as the usage says.
    assert [r["output_tokens"] for r in successful] == [OUTPUT_TOKENS] * REQUESTS
    assert benchmark["metrics"]["output_token_count"]["successful"]["total_sum"] == REQUESTS * OUTPUT_TOKENS
    # Text came back too (sampled at GuideLLM's temperature, a token may be a special one the text leaves out).
    assert any(r["output"] for r in successful)
    # The prompts were as long as asked (chat adds its template's tokens around them).
    assert all(r["prompt_tokens"] >= PROMPT_TOKENS for r in successful)
    if stream:   # only a stream has a first token apart from the last
        assert all(r["time_to_first_token_ms"] > 0 for r in successful)
    # They went through this stack's gateway.
    served_after = gateway_metric(stack, f'splitserve_gateway_requests_total{{endpoint="{endpoint}",status="200"}}')
    assert served_after - served_before == REQUESTS
