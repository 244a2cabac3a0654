"""Workers failing, clients leaving, the gateway draining: never a hang, KV freed at once."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from splitserve.client import Client, GatewayError


def _events(body: str) -> list[str]:
    return [e[len("data: "):] for e in body.split("\n\n") if e]


def test_decode_dying_mid_stream_ends_the_stream_with_an_error_event_without_migration(make_stack):
    stack = make_stack(num_decode=2, decode={"die_after_tokens": 1, "token_delay_s": 0.01})
    gateway = stack.start_gateway(max_decode_migrations=0)
    with gateway.http_client() as http:
        response = http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 50, "stream": True})
    assert response.status_code == 200
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable_error" and "decode" in error["message"]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text == " w11 w12"                                     # what was generated before the death
    dead = next(s for s in stack.decodes if s.servicer.requests)
    survivor = next(s for s in stack.decodes if s is not dead)
    survivor.servicer.die_after_tokens = None
    # The dead worker is out of the pool at once: the next request goes to the other one.
    assert not any(w.healthy for w in gateway.gateway.pool.workers("decode") if w.address == dead.address)
    result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=3)
    assert result.choices[0].text == " w11 w12 w13"
    assert len(survivor.servicer.requests) == 1


def _migrations(http, reason: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(f'splitserve_gateway_decode_migrations_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_decode_dying_mid_stream_moves_the_stream_to_another_worker(make_stack):
    """The client's stream goes on: the survivor gets every token produced so far and continues after them."""
    stack = make_stack(num_decode=2, decode={"token_delay_s": 0.01})
    gateway = stack.start_gateway()
    stack.decodes[0].servicer.die_after_tokens = 2
    stack.decodes[1].servicer.die_after_tokens = 2
    with gateway.http_client() as http:
        before = _migrations(http, "unavailable")
        response = http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 4, "stream": True})
        assert response.status_code == 200
        dead = next(s for s in stack.decodes if s.servicer.requests)
        survivor = next(s for s in stack.decodes if s is not dead)
        events = _events(response.text)
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert _migrations(http, "unavailable") == before + 1
    # The survivor was told what was produced (prefill's first token w11, then w12 w13), not streamed again.
    [resumed] = survivor.servicer.requests
    assert list(dead.servicer.requests[0].produced_token_ids) == [11]
    assert list(resumed.produced_token_ids) == [11, 12, 13]
    assert resumed.kv_handle.block_hashes == dead.servicer.requests[0].kv_handle.block_hashes
    assert text == " w11 w12 w13 w14" and finish[-1] == "length"


def test_a_second_death_is_not_migrated_again_by_default(make_stack):
    stack = make_stack(num_decode=3, decode={"die_after_tokens": 2, "token_delay_s": 0.01})
    gateway = stack.start_gateway()
    with gateway.http_client() as http:
        before = _migrations(http, "limit_reached")
        response = http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 50, "stream": True})
        events = _events(response.text)
        assert "error" in json.loads(events[-2])
        assert _migrations(http, "limit_reached") == before + 1
    assert sum(len(s.servicer.requests) for s in stack.decodes) == 2


def test_openai_client_sees_the_mid_stream_error(make_stack):
    stack = make_stack(decode={"die_after_tokens": 2})
    gateway = stack.start_gateway()
    stream = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=50, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_decode_failing_before_any_token_is_retried_on_another_worker(make_stack):
    stack = make_stack(num_prefill=0, num_decode=2)
    failing = stack.decodes[0].servicer
    failing.fail_with = grpc.StatusCode.UNAVAILABLE
    gateway = stack.start_gateway()
    before = REGISTRY.get_sample_value("splitserve_gateway_decode_retries_total") or 0
    for _ in range(2):   # ties rotate, so one of the two requests tries the failing worker first
        result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2)
        assert result.choices[0].text == " w11 w12"
    assert failing.requests
    assert (REGISTRY.get_sample_value("splitserve_gateway_decode_retries_total") or 0) >= before + 1


def test_decode_failing_after_prefill_with_no_other_worker(make_stack):
    stack = make_stack(decode={"fail_with": grpc.StatusCode.UNAVAILABLE})
    gateway = stack.start_gateway()
    with gateway.http_client() as http:
        response = http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 5})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "upstream_unavailable"


def _leave_mid_stream(stack, gateway):
    with gateway.http_client() as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            stack.wait_for(lambda: stack.decode.active == 1)


def _leave_while_waiting_for_a_whole_response(stack, gateway):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.base_url + "/v1/completions", json={"prompt": "x 10", "max_tokens": 200}, timeout=0.5)


@pytest.mark.parametrize("leave", [_leave_mid_stream, _leave_while_waiting_for_a_whole_response])
def test_a_client_that_leaves_cancels_its_decode_stream(make_stack, leave):
    stack = make_stack(decode={"token_delay_s": 0.02})
    gateway = stack.start_gateway()
    leave(stack, gateway)
    stack.wait_for(lambda: stack.decode.cancelled, timeout=2)
    assert stack.decode.finished == []
    stack.wait_for(lambda: gateway.gateway.admission.in_flight == 0)


def test_draining_finishes_requests_in_flight_and_refuses_new_ones(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.01})
    gateway = stack.start_gateway()
    with gateway.http_client() as http:
        with http.stream("POST", "/v1/completions",
                         json={"prompt": "x 10", "max_tokens": 40, "stream": True}) as in_flight:
            lines = in_flight.iter_lines()
            next(lines)
            drained = asyncio.run_coroutine_threadsafe(gateway.gateway.drain(), stack.loop.loop)
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["reason"] == "draining"
            refused = http.post("/v1/completions", json={"prompt": "x 10"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert not drained.done()
            rest = "\n".join(lines)
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in rest
    drained.result(timeout=5)
    # The fake's handler records the end after gRPC resumes it past the last chunk, which can be after the
    # gateway has already answered; wait for that bookkeeping, then check how the stream ended.
    stack.wait_for(lambda: stack.decode.finished or stack.decode.cancelled, timeout=2)
    assert stack.decode.finished and not stack.decode.cancelled


def test_requests_outliving_the_drain_grace_end_with_an_error_not_a_cut(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.02})
    gateway = stack.start_gateway()

    async def grpc_stream():
        async with Client(gateway.grpc_address) as client:
            return [chunk async for chunk in await client.generate("x 10", max_tokens=200, stream=True)]

    async def drain_with_grace(grace_s: float):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gateway.gateway.drain(), grace_s)   # as GrpcService.run does

    with gateway.http_client() as http:
        with http.stream("POST", "/v1/completions",
                         json={"prompt": "x 10", "max_tokens": 200, "stream": True}) as in_flight:
            lines = in_flight.iter_lines()
            next(lines)
            grpc_call = asyncio.run_coroutine_threadsafe(grpc_stream(), stack.loop.loop)
            stack.wait_for(lambda: stack.decode.active == 2)
            stack.loop.run(drain_with_grace(0.3))
            events = [line for line in lines if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["code"] == "shutting_down"
    with pytest.raises(GatewayError) as caught:
        grpc_call.result(timeout=5)
    assert caught.value.status_code == grpc.StatusCode.UNAVAILABLE
    stack.wait_for(lambda: len(stack.decode.cancelled) == 2)
    stack.wait_for(lambda: gateway.gateway.admission.in_flight == 0)


def test_health_all_waits_for_every_known_worker(make_stack):
    """The launcher's readiness: /health serves as soon as one of each is up; /health?all=true only when every
    worker the gateway was given is healthy, so the first requests are spread over all of them."""
    stack = make_stack(num_decode=2)
    gateway = stack.start_gateway()
    stack.loop.run(stack.decodes[1].stop())
    stack.wait_for(lambda: len(gateway.gateway.pool.healthy("decode")) == 1)
    with gateway.http_client() as http:
        assert http.get("/health").status_code == 200
        partial = http.get("/health", params={"all": "true"})
        assert partial.status_code == 503 and stack.decodes[1].address in partial.json()["reason"]


def test_the_first_token_streams_before_the_kv_handoff(make_stack):
    """The prefill worker's first token reaches the client at once; the decode call waits for the KV handle."""
    stack = make_stack(prefill={"handoff_delay_s": 1.0})
    gateway = stack.start_gateway()
    with gateway.http_client() as http:
        started = time.monotonic()
        first_at = None
        with http.stream("POST", "/v1/completions", json={"prompt": "x 10", "max_tokens": 3,
                                                          "stream": True}) as response:
            for line in response.iter_lines():
                if first_at is None and line.startswith("data: {"):
                    first_at = time.monotonic() - started
        ended_at = time.monotonic() - started
    assert stack.prefill.requests and first_at is not None
    assert first_at < 0.8 <= 1.0 <= ended_at, (first_at, ended_at)
    assert stack.decode.requests[-1].HasField("kv_handle")       # decode got the handle that came later


def test_a_prefill_worker_failing_after_the_first_token_leaves_the_prompt_to_decode(make_stack):
    """The stream goes on: the decode worker computes the prompt itself (no handle), and the failure is counted."""
    stack = make_stack(prefill={"handoff_error": grpc.StatusCode.UNAVAILABLE})
    gateway = stack.start_gateway()
    labels = {"kind": "prefill", "code": "UNAVAILABLE"}
    before = REGISTRY.get_sample_value("splitserve_gateway_worker_failures_total", labels) or 0
    result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=3)
    assert result.choices[0].text == " w11 w12 w13" and result.choices[0].finish_reason == "length"
    decode_request = stack.decode.requests[-1]
    assert not decode_request.HasField("kv_handle") and list(decode_request.produced_token_ids) == [11]
    assert REGISTRY.get_sample_value("splitserve_gateway_worker_failures_total", labels) == before + 1
