"""Workers die mid-request: the client's stream ends with an error event (never a hang) and the next request is
served by the surviving worker."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair_stack(llama_ckpt, tmp_path_factory):
    with Stack(model=str(llama_ckpt), prefill_workers=2, decode_workers=2, torch_threads=1, num_kv_blocks=256,
               log_dir=str(tmp_path_factory.mktemp("fault-logs")), grace_s=3) as running:
        yield running


def _model(stack):
    return httpx.get(f"{stack.base_url}/models", timeout=10).json()["data"][0]["id"]


def _complete(stack, prompt, max_tokens=8):
    response = httpx.post(f"{stack.base_url}/completions", timeout=60, json={
        "model": _model(stack), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})
    return response


def _busy_decode_index(stack) -> int:
    """Which decode worker runs something now (from their Stats RPCs)."""
    from e2e_stack import _call
    from splitserve.protos.splitserve.v1 import decode_pb2, decode_pb2_grpc

    for _ in range(100):
        for i, address in enumerate(stack.addresses["decode"]):
            stats = _call(address, decode_pb2_grpc.DecodeStub, "Stats", decode_pb2.DecodeStatsRequest()).engine
            if stats.num_running:
                return i
        time.sleep(0.05)
    raise AssertionError("no decode worker is running the request")


def test_killing_the_decode_worker_mid_stream_ends_the_stream_with_an_error(pair_stack):
    stack = pair_stack
    body = {"model": _model(stack), "prompt": list(range(3, 90)), "max_tokens": 900, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    events = []
    started = time.monotonic()
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{stack.base_url}/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 3:
                    stack.process("decode", _busy_decode_index(stack)).kill()
    assert time.monotonic() - started < 60
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert "error" in error and error["error"]["message"]
    # The next requests are served by the surviving decode worker.
    for prompt in ("after the crash", list(range(10, 50))):
        response = _complete(stack, prompt)
        assert response.status_code == 200, response.text


def _prefill_queries(stack, index):
    from e2e_stack import _call
    from splitserve.protos.splitserve.v1 import prefill_pb2, prefill_pb2_grpc

    return _call(stack.addresses["prefill"][index], prefill_pb2_grpc.PrefillStub, "Stats",
                 prefill_pb2.PrefillStatsRequest()).engine.prefix_cache_queries


def test_killing_a_prefill_worker_keeps_the_stack_serving(pair_stack):
    stack = pair_stack
    survivor_before = _prefill_queries(stack, 1)
    stack.process("prefill", 0).kill()
    stack.process("prefill", 0).wait(10)
    # Long prompts need remote prefill; every one of them must still succeed (on the other worker, or by the
    # gateway's counted fallback to local prefill while the dead worker is being noticed).
    for i in range(4):
        response = _complete(stack, list(range(20 + i, 120 + i)))
        assert response.status_code == 200, response.text
    # The surviving worker did prefill work after the crash.
    assert _prefill_queries(stack, 1) > survivor_before
