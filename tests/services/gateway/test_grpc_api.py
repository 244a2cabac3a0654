"""The public gRPC API through splitserve.client: the same results as REST, errors as gRPC statuses."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from splitserve.client import Client, GatewayError, SyncClient

from . import fakes

MESSAGES = [{"role": "user", "content": "hi there"}]


def _generate(stack, gateway, prompt, api_key=None, **kwargs):
    async def call():
        async with Client(gateway.grpc_address, api_key=api_key) as client:
            return await client.generate(prompt, **kwargs)

    return stack.loop.run(call())


def _stream(stack, gateway, prompt, **kwargs):
    async def call():
        async with Client(gateway.grpc_address) as client:
            return [chunk async for chunk in await client.generate(prompt, stream=True, **kwargs)]

    return stack.loop.run(call())


def test_text_prompt_gives_the_same_result_as_rest(stack, gateway):
    rest = gateway.openai().completions.create(model="fake-model", prompt="x 995", max_tokens=8, temperature=0)
    result = _generate(stack, gateway, "x 995", max_tokens=8, temperature=0)
    assert result.text == rest.choices[0].text == " w996é w999"
    assert result.token_ids == [996, 997, 998, 999, 0]
    assert result.finish_reason == rest.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == rest.usage.prompt_tokens
    assert result.usage.completion_tokens == rest.usage.completion_tokens
    assert result.usage.cached_tokens == rest.usage.prompt_tokens_details.cached_tokens
    assert result.request_id


def test_chat_and_token_ids(stack, gateway):
    rest = gateway.openai().chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=4)
    assert _generate(stack, gateway, MESSAGES, max_tokens=4).text == rest.choices[0].message.content
    assert _generate(stack, gateway, [5, 6], max_tokens=3).text == "é w9"


def test_min_tokens_holds_back_stop_strings(stack, gateway):
    result = _generate(stack, gateway, "x 40", max_tokens=20, stop=" w4", min_tokens=3)
    assert (result.text, result.token_ids, result.finish_reason) == (" w41 w42 w43", [41, 42, 43, 44], "stop")
    assert stack.prefill.requests[-1].sampling_params.min_tokens == 3


def test_stream_chunks_and_special_tokens(stack, gateway):
    chunks = _stream(stack, gateway, "x 996", max_tokens=5, skip_special_tokens=False, request_id="my-id")
    assert "".join(c.text for c in chunks) == "é w999<|endoftext|>"
    assert [t for c in chunks for t in c.token_ids] == [997, 998, 999, 0]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 4
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert {c.request_id for c in chunks} == {"my-id"}
    assert stack.prefill.requests[0].request_id.startswith("my-id-")   # unique per request, traceable


def test_n_stop_and_logprobs(stack, gateway):
    results = _generate(stack, gateway, "x 40", max_tokens=10, n=2, seed=3, stop=[" w46", " w45"], logprobs=1)
    assert [r.index for r in results] == [0, 1]
    assert results[0].text == " w42 w44" and results[0].stop == " w46" and results[0].finish_reason == "stop"
    assert results[0].token_ids == [42, 44, 46] and results[0].usage.completion_tokens == 3
    assert [lp.token_id for lp in results[0].logprobs] == results[0].token_ids
    assert results[0].logprobs[0].top == [(42, -0.5)]
    assert results[1].text == " w41 w42 w43 w44" and results[1].stop == " w45"


def test_stop_names_the_stop_token_id(stack, gateway):
    result = _generate(stack, gateway, "x 40", max_tokens=20, stop_token_ids=[43])
    assert (result.text, result.finish_reason, result.stop) == (" w41 w42 w43", "stop", 43)


@pytest.mark.parametrize("kwargs, code, param", [
    ({"temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"stop_token_ids": [fakes.FORBIDDEN_STOP_TOKEN]}, grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids"),
    ({"model": "gpt-9"}, grpc.StatusCode.NOT_FOUND, None),
    ({"max_tokens": 10_000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
])
def test_errors_are_grpc_statuses(stack, gateway, kwargs, code, param):
    with pytest.raises(GatewayError) as caught:
        _generate(stack, gateway, "x 10", **kwargs)
    assert caught.value.status_code == code
    assert caught.value.param == param
    assert caught.value.message


def test_api_key_and_no_worker(stack):
    keyed = stack.start_gateway(api_key="sesame")
    with pytest.raises(GatewayError) as caught:
        _generate(stack, keyed, "x 10", api_key="wrong")
    assert caught.value.status_code == grpc.StatusCode.UNAUTHENTICATED
    assert _generate(stack, keyed, "x 10", api_key="sesame", max_tokens=1).text == " w11"
    workerless = stack.start_gateway(decode_addresses=["127.0.0.1:1"])
    with pytest.raises(GatewayError) as caught:
        _generate(stack, workerless, "x 10")
    assert caught.value.status_code == grpc.StatusCode.UNAVAILABLE


def test_cancelling_the_call_cancels_decode(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.02})
    gateway = stack.start_gateway()

    async def read_two_then_stop():
        async with Client(gateway.grpc_address) as client:
            stream = await client.generate("x 10", max_tokens=200, stream=True)
            got = [await stream.__anext__(), await stream.__anext__()]
            await stream.aclose()
            return got

    assert len(stack.loop.run(read_two_then_stop())) == 2
    stack.wait_for(lambda: stack.decode.cancelled, timeout=2)
    assert stack.decode.finished == []


def test_sync_client(gateway):
    with SyncClient(gateway.grpc_address) as client:
        assert client.generate("x 10", max_tokens=2).text == " w11 w12"
        assert "".join(c.text for c in client.generate("x 10", max_tokens=2, stream=True)) == " w11 w12"
        with pytest.raises(GatewayError) as caught:
            client.generate("x 10", top_p=0.0)
        assert caught.value.status_code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.param == "top_p"


def test_importing_the_client_does_not_import_torch():
    code = "import sys, splitserve.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
