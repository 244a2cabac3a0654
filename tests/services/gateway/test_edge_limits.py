"""The public edge's limits: bad input is a 4xx (never a 5xx), bodies and prompts have byte limits, the admission
queue sheds load with 429, clients may reuse X-Request-Id, and /metrics is behind the API key."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time

import grpc
import httpx
import pytest

from splitserve.client import Client, GatewayError
from splitserve.v1 import gateway_pb2
from splitserve.services.gateway import metrics
from splitserve.services.gateway.admission import Admission
from splitserve.services.gateway.errors import DrainingError, OverloadedError

CHAT = [{"role": "user", "content": "hi"}]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def _post_raw(gateway, path: str, raw: str) -> httpx.Response:
    with gateway.http_client() as http:
        return http.post(path, content=raw.encode(), headers={"content-type": "application/json"})


# --- bad input: 400 with the parameter, not a 5xx ---------------------------------------------------------------


@pytest.mark.parametrize("path, raw, param", [
    ("/v1/completions", '{"prompt": "x 1", "seed": 18446744073709551616}', "seed"),          # 2**64
    ("/v1/completions", '{"prompt": "x 1", "seed": -9223372036854775809}', "seed"),          # -2**63 - 1
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}',
     "seed"),
    ("/v1/completions", '{"prompt": "x \\ud800 1"}', "prompt"),
    ("/v1/completions", '{"prompt": ["x \\ud800"]}', "prompt[0]"),
    ("/v1/completions", '{"prompt": "x 1", "stop": ["a\\udfff"]}', "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", '{"prompt": "x 1", "temperature": NaN}', None),                      # not JSON at all
    ("/v1/completions", '{"prompt": "x 1", "top_p": Infinity}', None),
    ("/v1/completions", '{"prompt": "x 1", "n": 129}', "n"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "n": 129}', "n"),
])
def test_bad_input_is_400_naming_the_parameter(gateway, path, raw, param):
    error = _error(_post_raw(gateway, path, raw), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_a_seed_at_the_int64_edge_still_samples_n_sequences(gateway):
    # n sequences take seed, seed + 1, ...: past 2**63 - 1 they wrap instead of overflowing the wire type.
    response = gateway.openai().completions.create(model="fake-model", prompt="x 40", max_tokens=2, n=2,
                                                   seed=2**63 - 1)
    assert len(response.choices) == 2


@pytest.mark.parametrize("name", ["temperature", "repetition_penalty"])
def test_sampling_params_refuse_non_finite_values(name):
    from splitserve.sampling_params import InvalidRequestError, SamplingParams
    # 1e39 is a finite double but no 32-bit float: on the wire to the workers it would become infinity.
    for value in (math.nan, math.inf, 1e39):
        with pytest.raises(InvalidRequestError) as failure:
            SamplingParams(**{name: value})
        assert failure.value.param == name


def test_a_temperature_beyond_32_bit_floats_is_a_400(gateway):
    import openai
    with pytest.raises(openai.BadRequestError) as failure:
        gateway.openai().completions.create(model="fake-model", prompt="x 4", max_tokens=2, temperature=1e39)
    assert failure.value.body["param"] == "temperature"


# --- byte limits --------------------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_before_it_is_read(stack):
    gateway = stack.start_gateway(max_body_bytes=1000)
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x " * 600}), 413)
        assert "1000 bytes" in error["message"] and error["code"] == "request_too_large"

        def chunked():   # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"x " * 50
            yield b'"}'
        error = _error(http.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}),
                       413)
        assert "1000 bytes" in error["message"]
        assert http.post("/v1/completions", json={"prompt": "x 1", "max_tokens": 1}).status_code == 200


def test_a_10_mb_prompt_is_413_at_once(gateway):
    started = time.monotonic()
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x" * 10_000_000}), 413)
    assert str(8 * 2**20) in error["message"]
    assert time.monotonic() - started < 10   # generous: only that it is not the request timeout


def test_a_prompt_over_the_prompt_limit_is_413_before_tokenizing(stack):
    gateway = stack.start_gateway()
    # The fake model's context is 256 tokens: by default prompts may hold 16 bytes per token.
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x " * 2100}), 413)
        assert error["param"] == "prompt" and "4096 bytes" in error["message"]
        error = _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 2100}]}),
                       413)
        assert error["param"] == "messages"
    small = stack.start_gateway(max_prompt_bytes=100)
    with small.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x " * 51}), 413)
        assert "100 bytes" in error["message"]


def _raw_generate(gateway, data: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        call = channel.unary_stream("/splitserve.v1.Gateway/Generate", request_serializer=lambda b: b,
                                    response_deserializer=gateway_pb2.GatewayGenerateChunk.FromString)
        with pytest.raises(grpc.RpcError) as failure:
            list(call(data, timeout=10))
    return failure.value


def test_grpc_bad_input_is_invalid_argument(stack):
    gateway = stack.start_gateway(max_body_bytes=6000)
    good = gateway_pb2.GatewayGenerateRequest(text="x ok").SerializeToString()
    error = _raw_generate(gateway, good.replace(b"x ok", b"x \xed\xa0"))    # half a UTF-8-encoded surrogate
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in error.details()
    error = _raw_generate(gateway, gateway_pb2.GatewayGenerateRequest(text="x " * 2100).SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "4096 bytes" in error.details()
    error = _raw_generate(gateway, gateway_pb2.GatewayGenerateRequest(text="x " * 3100).SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def call(**kwargs):
        async with Client(gateway.grpc_address) as client:
            with pytest.raises(GatewayError) as failure:
                await client.generate("x 1", **kwargs)
        return failure.value

    for kwargs, param in (({"temperature": math.nan}, "temperature"), ({"n": 129}, "n")):
        error = stack.loop.run(call(**kwargs))
        assert error.status_code == grpc.StatusCode.INVALID_ARGUMENT and error.param == param


# --- X-Request-Id -------------------------------------------------------------------------------------------------


def test_concurrent_requests_may_share_an_x_request_id(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.05})
    gateway = stack.start_gateway()

    def post(_):
        with gateway.http_client() as http:
            return http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 6, "stream": _ == 1},
                             headers={"X-Request-Id": "trace-42"})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(post, range(2)))
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "trace-42"
    ids = {r.request_id for r in stack.decode.requests}
    assert len(ids) == 2 and all(i.startswith("trace-42-") for i in ids)


def test_errors_echo_the_x_request_id_too(gateway):
    with gateway.http_client() as http:
        response = http.post("/v1/completions", json={"prompt": "x 1", "n": 0}, headers={"X-Request-Id": "abc"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "abc"


# --- load shedding ------------------------------------------------------------------------------------------------


def _shed_count() -> float:
    return metrics.SHED._value.get()


def test_beyond_max_in_flight_and_max_queued_requests_get_429_with_retry_after(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.1})
    gateway = stack.start_gateway(max_in_flight=1, max_queued=1)
    admission = gateway.gateway.admission
    shed_before = _shed_count()

    def post(max_tokens):
        with gateway.http_client() as http:
            return http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": max_tokens})

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, 5)
        stack.wait_for(lambda: stack.decode.active == 1)
        queued = pool.submit(post, 1)
        stack.wait_for(lambda: len(admission._waiting) == 1)
        response = post(1)
        error = _error(response, 429)
        assert response.headers["retry-after"] == "1"
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert _shed_count() == shed_before + 1

        async def grpc_call():
            async with Client(gateway.grpc_address) as client:
                with pytest.raises(GatewayError) as failure:
                    await client.generate("x 1", max_tokens=1)
            return failure.value
        assert stack.loop.run(grpc_call()).status_code == grpc.StatusCode.RESOURCE_EXHAUSTED

        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert admission.in_flight == 0 and not admission._waiting


async def _one_admitted_two_queued():
    """An admission with one slot and room for two in its queue, full: (admission, the ticket, the two waiters)."""
    admission = Admission(max_in_flight=1, max_queued=2)
    first = await admission.admit()
    second = asyncio.ensure_future(admission.admit())
    third = asyncio.ensure_future(admission.admit())
    await asyncio.sleep(0)
    return admission, first, second, third


def test_admission_is_first_come_first_served_and_leaves_no_slot_behind():
    async def scenario():
        admission, first, second, third = await _one_admitted_two_queued()
        with pytest.raises(OverloadedError):
            await admission.admit()
        second.cancel()                      # a client that went away leaves the queue
        await asyncio.sleep(0)
        first.release()
        ticket = await asyncio.wait_for(third, 1)
        assert admission.in_flight == 1 and not admission._waiting
        waiting = asyncio.ensure_future(admission.admit())
        await asyncio.sleep(0)
        admission.start_draining()           # queued requests go elsewhere; running ones finish
        with pytest.raises(DrainingError):
            await waiting
        ticket.release()
        await asyncio.wait_for(admission.wait_idle(), 1)
        assert admission.in_flight == 0

    asyncio.run(scenario())


def test_a_waiter_woken_and_cancelled_in_one_turn_passes_its_slot_on():
    async def scenario():
        admission, first, second, third = await _one_admitted_two_queued()
        first.release()        # hands the slot to `second`...
        second.cancel()        # ...which is cancelled before it runs
        ticket = await asyncio.wait_for(third, 1)
        assert admission.in_flight == 1
        ticket.release()
        assert admission.in_flight == 0

    asyncio.run(scenario())


# --- /metrics -----------------------------------------------------------------------------------------------------


def test_metrics_need_the_api_key_when_one_is_set(stack):
    gateway = stack.start_gateway(api_key="sesame")
    with gateway.http_client() as http:
        assert _error(http.get("/metrics"), 401)["type"] == "authentication_error"
        reply = http.get("/metrics", headers={"Authorization": "Bearer sesame"})
        assert reply.status_code == 200 and "splitserve_gateway_requests_total" in reply.text
        assert http.get("/health").status_code == 200    # load balancers' checks carry no key

