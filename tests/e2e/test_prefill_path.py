"""Selective disaggregation through real workers (the default --prefill-decider predicted): with nothing measured
the first prompt goes to the prefill worker (cold start), which measures its prefill and KV write rates and
announces them to Redis; the same prompt again is then predicted faster on the decode worker, which holds its
prefix since it read the KV (no transfer), and gives the same greedy text with the prefix reused."""

from __future__ import annotations

import time

import pytest
import redis

from e2e_stack import complete, gateway_metric, wait_until
from splitserve.launcher.stack import Stack
from splitserve.worker_registry import WorkerInfo, registry_key

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def predicted_stack(llama_ckpt, tmp_path_factory):
    with Stack(model=str(llama_ckpt), tokenizer_replicas=1, envoy=False, torch_threads=1, num_kv_blocks=256,
               log_dir=str(tmp_path_factory.mktemp("prefill-path-logs")), grace_s=3) as running:
        yield running


def _announced(stack, kind: str) -> WorkerInfo:
    client = redis.Redis.from_url(stack.redis_url, socket_timeout=2)
    try:
        [raw] = client.hgetall(registry_key(kind)).values()
        return WorkerInfo.from_json(raw)
    finally:
        client.close()


def _paths(stack) -> dict[str, float]:
    return {f"{path}/{reason}": gateway_metric(stack, f'splitserve_gateway_prefill_path_total{{path="{path}",'
                                                     f'reason="{reason}"}}')
            for path, reason in (("remote", "cold_start"), ("remote", "predicted_faster"),
                                 ("local", "predicted_faster"))}


def test_cold_start_goes_remote_then_a_held_prefix_is_prefilled_locally(predicted_stack):
    stack = predicted_stack
    # 18 full blocks of 16, and 12 tokens: a KV write long enough to measure the write rate (16 blocks or more).
    prompt = [3 + (11 * i) % 250 for i in range(300)]
    first = complete(stack.base_url, prompt, max_tokens=4)
    assert first.status_code == 200, first.text
    assert _paths(stack) == {"remote/cold_start": 1, "remote/predicted_faster": 0, "local/predicted_faster": 0}
    # The prefill worker measured its prefill (300 tokens in one step) and its KV write, and announced them.
    prefill = wait_until(lambda: (lambda info: info if info.prefill_tokens_per_s and info.kv_put_bytes_per_s
                                  else None)(_announced(stack, "prefill")))
    assert prefill.kv_bytes_per_token > 0 and prefill.queued_prompt_tokens == 0
    time.sleep(3)           # the gateway rereads the registry every second (health_check_interval_s)
    second = complete(stack.base_url, prompt, max_tokens=4)
    assert second.status_code == 200, second.text
    assert _paths(stack) == {"remote/cold_start": 1, "remote/predicted_faster": 0, "local/predicted_faster": 1}
    assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 18 * 16
