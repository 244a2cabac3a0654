"""Every failure leaves as an OpenAI error body with the right status; the api key; /v1/models and /health."""

from __future__ import annotations

import openai
import pytest

from . import fakes


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


def test_malformed_json_is_400_not_422(gateway):
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", content=b"{not json",
                                 headers={"content-type": "application/json"}), 400)
        assert error["type"] == "invalid_request_error"
        error = _error(http.post("/v1/chat/completions", json=["a", "list"]), 400)
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x 1", "max_tokens": "many"}, "max_tokens"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["x 1", "INVALID"]}, "prompt"),                     # one bad prompt fails the whole batch
    ({"prompt": ["x 1"] * 129, "n": 2}, "prompt"),                 # over MAX_BATCH_SEQUENCES sequences
    ({"prompt": [[5], [100000]]}, "prompt"),
    ({"prompt": "x 1", "suffix": " end"}, "suffix"),
    ({"prompt": "x 1", "logit_bias": {"one": 5}}, "logit_bias"),
    ({"prompt": "x 1", "logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"prompt": "x 1", "logit_bias": {"-1": 5}}, "logit_bias"),
    ({"prompt": "x 1", "logit_bias": {str(fakes.VOCAB): 5}}, "logit_bias"),
    ({"prompt": "x 1", "temperature": -1}, "temperature"),
    ({"prompt": "x 1", "top_p": 0}, "top_p"),
    ({"prompt": "x 1", "n": 0}, "n"),
    ({"prompt": "x 1", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x 1", "max_tokens": 2, "min_tokens": 3}, "min_tokens"),
    ({"prompt": "x 1", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "x 1", "min_tokens": 1.5}, "min_tokens"),
    ({"prompt": "x 1", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x 1", "echo": True, "max_tokens": -1}, "max_tokens"),              # only 0 is lifted for echo
    ({"prompt": "x 1", "echo": True, "max_tokens": 0, "min_tokens": 2}, "min_tokens"),
    ({"prompt": "x 1", "logprobs": 50}, "logprobs"),
    ({"prompt": "x 1", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [5, 100000]}, "prompt"),
    ({"prompt": "x 1", "stop_token_ids": [100000]}, "stop_token_ids"),
    ({"prompt": "x 1", "stop_token_ids": [fakes.FORBIDDEN_STOP_TOKEN]}, "stop_token_ids"),   # refused by prefill
    ({"prompt": "INVALID"}, "prompt"),                                                       # refused by tokenizer
])
def test_invalid_completion_requests_name_the_parameter(gateway, body, param):
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"content": "no role"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": 2**31}, "top_k"),    # over int32, its wire type
    ({"messages": [{"role": "user", "content": "x"}], "repetition_penalty": 3e215}, "repetition_penalty"),  # float32
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 1e39}, "temperature"),
])
def test_invalid_chat_requests_name_the_parameter(gateway, body, param):
    with gateway.http_client() as http:
        error = _error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param


def test_unknown_fields_are_ignored(gateway):
    with gateway.http_client() as http:
        response = http.post("/v1/completions", json={"prompt": "x 1", "max_tokens": 1, "frobnicate": True})
    assert response.status_code == 200


def test_unknown_model_is_404_model_not_found(gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.openai().completions.create(model="gpt-9", prompt="x 1")
    assert caught.value.body["code"] == "model_not_found"
    with gateway.http_client() as http:
        error = _error(http.post("/v1/chat/completions",
                                 json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_prompt_over_the_context_is_context_length_exceeded(make_stack):
    stack = make_stack(tokenizer={"max_context_length": 20})
    gateway = stack.start_gateway()
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "w " * 25}), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
        # The prompt fits, but not with the completion asked for.
        error = _error(http.post("/v1/completions", json={"prompt": "w " * 10, "max_tokens": 11}), 400)
        assert error["code"] == "context_length_exceeded"
        assert "20 tokens" in error["message"]
        assert http.post("/v1/completions", json={"prompt": "w " * 10, "max_tokens": 10}).status_code == 200
        error = _error(http.post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "w " * 25}]}), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        # Chat without max_tokens fills the context, but never below min_tokens.
        chat = {"messages": [{"role": "user", "content": "w " * 5}]}
        assert http.post("/v1/chat/completions", json={**chat, "min_tokens": 3}).status_code == 200
        error = _error(http.post("/v1/chat/completions", json={**chat, "min_tokens": 19}), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


def test_api_key(stack):
    gateway = stack.start_gateway(api_key="sesame")
    with gateway.http_client() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            error = _error(http.post("/v1/completions", json={"prompt": "x 1"}, headers=headers), 401)
            assert error["type"] == "authentication_error"
        _error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200               # probes need no key
    with pytest.raises(openai.AuthenticationError):
        gateway.openai(api_key="wrong").completions.create(model="fake-model", prompt="x 1")
    result = gateway.openai(api_key="sesame").completions.create(model="fake-model", prompt="x 10", max_tokens=1)
    assert result.choices[0].text == " w11"


def test_models_lists_the_served_model(stack):
    default = stack.start_gateway()
    [model] = default.openai().models.list().data
    assert model.id == "fake-model" and model.owned_by == "splitserve"
    renamed = stack.start_gateway(served_model_name=["my-model"])
    assert [m.id for m in renamed.openai().models.list().data] == ["my-model"]
    assert renamed.openai().completions.create(model="my-model", prompt="x 10", max_tokens=1).choices[0].text == " w11"
    with pytest.raises(openai.NotFoundError):
        renamed.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=1)


def test_no_healthy_decode_worker_is_503_and_health_says_so(stack):
    dead = "127.0.0.1:1"    # nothing listens there
    gateway = stack.start_gateway(decode_addresses=[dead])
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x 1"}), 503)
        assert error["code"] == "no_healthy_worker"
        health = http.get("/health")
        assert health.status_code == 503 and "decode" in health.json()["reason"]
        error = _error(http.post("/v1/completions", json={"prompt": "x 1", "stream": True}), 503)
    with pytest.raises(openai.InternalServerError):
        gateway.openai().completions.create(model="fake-model", prompt="x 1")


def test_health_needs_the_tokenizer(stack):
    gateway = stack.start_gateway(tokenizer_addresses=["127.0.0.1:1"])
    with gateway.http_client() as http:
        health = http.get("/health")
        assert health.status_code == 503 and "tokenizer" in health.json()["reason"]
        _error(http.post("/v1/completions", json={"prompt": "x 1"}), 503)
    healthy = stack.start_gateway()
    with healthy.http_client() as http:
        assert http.get("/health").json() == {"status": "ok"}


def test_engine_error_is_500(make_stack):
    stack = make_stack(decode={"engine_error": "CUDA out of memory"}, num_prefill=0)
    gateway = stack.start_gateway()
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x 1"}), 500)
        assert "CUDA out of memory" in error["message"]
        # Nothing was produced yet, so a streamed request fails with a status too, not a 200 and an event.
        _error(http.post("/v1/completions", json={"prompt": "x 1", "stream": True}), 500)


def test_request_timeout_is_504(make_stack):
    stack = make_stack(decode={"token_delay_s": 0.2})
    gateway = stack.start_gateway(request_timeout_s=0.5)
    with gateway.http_client() as http:
        error = _error(http.post("/v1/completions", json={"prompt": "x 1", "max_tokens": 50}), 504)
    assert error["code"] == "timeout"
    stack.wait_for(lambda: stack.decode.active == 0)


def test_unknown_route_is_an_openai_404(gateway):
    with gateway.http_client() as http:
        _error(http.post("/v1/embeddings", json={}), 404)
        _error(http.get("/v1/completions"), 405)


def test_metrics_count_requests_by_endpoint_and_status(gateway):
    with gateway.http_client() as http:
        http.post("/v1/completions", json={"prompt": "x 1", "max_tokens": 1})
        http.post("/v1/completions", json={"prompt": "x 1", "n": 0})
        text = http.get("/metrics").text
    assert 'splitserve_gateway_requests_total{endpoint="completions",status="200"}' in text
    assert 'splitserve_gateway_requests_total{endpoint="completions",status="400"}' in text
    for name in ("splitserve_gateway_time_to_first_token_seconds_bucket",
                 "splitserve_gateway_e2e_request_latency_seconds_count", "splitserve_gateway_prompt_tokens_total",
                 "splitserve_gateway_generation_tokens_total", "splitserve_gateway_requests_in_flight",
                 "splitserve_router_decisions_total", "splitserve_gateway_inter_token_latency_seconds_count"):
        assert name in text
