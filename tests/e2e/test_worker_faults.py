"""Workers die mid-request: a decode worker's streams move to the surviving one (the client sees no error), a
prefill worker's requests go to the other one, and the next requests are served."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from e2e_stack import gateway_metric
from splitserve.launcher.stack import Stack

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pair_stack(llama_ckpt, tmp_path_factory):
    # Restarts off: these tests are about the gateway routing around a worker that stays dead
    # (test_stack_processes.py covers the restart).
    # Every prompt through a prefill worker (--prefill-decider threshold), which the prefill worker's death is
    # about; the predicted choice would prefill some on the decode workers.
    with Stack(model=str(llama_ckpt), prefill_workers=2, decode_workers=2, torch_threads=1, num_kv_blocks=256,
               log_dir=str(tmp_path_factory.mktemp("fault-logs")), grace_s=3, max_restarts=0,
               prefill_decider="threshold") as running:
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
    from splitserve.v1 import common_pb2, decode_pb2_grpc

    for _ in range(100):
        for i, address in enumerate(stack.addresses["decode"]):
            stats = _call(address, decode_pb2_grpc.DecodeStub, "Stats", common_pb2.WorkerStatsRequest()).engine
            if stats.num_running:
                return i
        time.sleep(0.05)
    raise AssertionError("no decode worker is running the request")


def _decode_holding(stack, index: int) -> int:
    """Streams a decode worker holds: running, or waiting in its queue (admission or preemption)."""
    from e2e_stack import _call
    from splitserve.v1 import common_pb2, decode_pb2_grpc

    engine = _call(stack.addresses["decode"][index], decode_pb2_grpc.DecodeStub, "Stats",
                   common_pb2.WorkerStatsRequest()).engine
    return engine.num_running + engine.num_waiting


def _ended_early(tasks, events, ended) -> str:
    """Why the kill never came: streams that ended before every stream ran (their error, or their last event)."""
    reasons = []
    for i in ended:
        error = tasks[i].exception()
        last = events[i][-1][1] if events[i] else None
        reasons.append(f"stream {i}: {error!r}" if error else f"stream {i} ended after {len(events[i])} events: {last}")
    return "streams ended before the kill: " + "; ".join(reasons)


def test_killing_a_decode_worker_mid_stream_moves_its_streams(pair_stack, llama_ckpt):
    """16 greedy streams, SIGKILL one of the two decode workers mid-stream: every stream completes with the
    offline engine's text; the streams that were on the killed worker move to the other, none lost: migrated if the
    gateway had a token of theirs from it, retried if not (still waiting there, or its first chunk in flight), each
    counted once."""
    from splitserve import LLM, SamplingParams

    stack = pair_stack
    model = _model(stack)
    prompts = [list(range(3 + i, 60 + 3 * i)) for i in range(16)]
    max_tokens = 600
    migrations_before = gateway_metric(stack, "splitserve_gateway_decode_migrations_total")
    retries_before = gateway_metric(stack, "splitserve_gateway_decode_retries_total")
    deadline = time.monotonic() + 30   # both decode workers routable (the gateway checks health every second)
    while gateway_metric(stack, 'splitserve_gateway_healthy_workers{kind="decode"}') < 2:
        assert time.monotonic() < deadline, "the gateway never saw both decode workers healthy"
        time.sleep(0.2)

    async def stream(http, prompt, events):
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        async with http.stream("POST", f"{stack.base_url}/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append((time.monotonic(), json.loads(line[6:])))

    async def run():
        events = [[] for _ in prompts]
        async with httpx.AsyncClient(timeout=120) as http:
            tasks = [asyncio.create_task(stream(http, p, e)) for p, e in zip(prompts, events)]
            # Kill once the workers hold every stream (their own Stats, not the clients' events: the gateway's
            # streams can lag the workers on a loaded machine, and a worker could be done already).
            on_killed = on_other = 0
            deadline = time.monotonic() + 60   # a stream that never shows as running ends the test, not hangs it
            while on_killed + on_other < len(prompts):   # every stream is on one of the two
                assert time.monotonic() < deadline, f"streams on the decode workers: {on_killed}+{on_other}"
                ended = [i for i, task in enumerate(tasks) if task.done()]
                assert not ended, _ended_early(tasks, events, ended)
                await asyncio.sleep(0.01)
                on_killed = await asyncio.to_thread(_decode_holding, stack, 0)
                on_other = await asyncio.to_thread(_decode_holding, stack, 1)
            stack.process("decode", 0).kill()
            switch = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return events, on_killed, time.monotonic() - switch

    events, on_killed, after_kill = asyncio.run(run())
    reference = LLM(str(llama_ckpt), dtype="float32", device="cpu", num_kv_blocks=512)
    expected = reference.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    gaps = []  # each stream's longest pause between two events: the switch, for the migrated ones
    for i, (timed_events, ref) in enumerate(zip(events, expected)):
        gaps.append(max(b[0] - a[0] for a, b in zip(timed_events, timed_events[1:])))
        stream_events = [e for _, e in timed_events]
        assert all("error" not in e for e in stream_events), (i, stream_events[-1])
        text = "".join(e["choices"][0]["text"] for e in stream_events if e.get("choices"))
        assert text == ref.outputs[0].text, f"stream {i} differs from the offline engine"
        assert stream_events[-1]["choices"][0]["finish_reason"] == "length"
    assert on_killed > 0
    migrated = gateway_metric(stack, "splitserve_gateway_decode_migrations_total") - migrations_before
    retried = gateway_metric(stack, "splitserve_gateway_decode_retries_total") - retries_before
    assert migrated + retried == on_killed, (migrated, retried, on_killed)
    gaps.sort()
    print(f"failover: {len(prompts)} streams kept, {migrated:.0f} migrated and {retried:.0f} retried, 0 lost; "
          f"{after_kill:.2f} s from the kill to "
          f"the last stream's end; longest pause per stream: median {gaps[len(gaps) // 2]:.3f} s, "
          f"max {gaps[-1]:.3f} s")
    from e2e_stack import wait_until_pools_whole

    killed = frozenset(stack.addresses["decode"][:1])
    whole, stats, store = wait_until_pools_whole(stack, exclude=killed)
    assert whole, (stats, store)
    # The next requests are served by the surviving decode worker.
    for prompt in ("after the crash", list(range(10, 50))):
        response = _complete(stack, prompt)
        assert response.status_code == 200, response.text


def _prefill_queries(stack, index):
    from e2e_stack import _call
    from splitserve.v1 import common_pb2, prefill_pb2_grpc

    return _call(stack.addresses["prefill"][index], prefill_pb2_grpc.PrefillStub, "Stats",
                 common_pb2.WorkerStatsRequest()).engine.prefix_cache_queries


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
