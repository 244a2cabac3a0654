"""Several tokenizer replicas: calls are spread over them, and a call that finds its replica down is retried once
on another, so losing a replica costs no request."""

from __future__ import annotations

from prometheus_client import REGISTRY

from . import fakes


def _retries(method: str) -> float:
    return REGISTRY.get_sample_value("splitserve_gateway_tokenizer_retries_total", {"method": method}) or 0.0


def _all_retries() -> float:
    return sum(_retries(m) for m in ("GetInfo", "Tokenize", "Detokenize"))


def _two_replicas(stack, **settings):
    second = stack.start_server(fakes.tokenizer_server)
    # Health checks far apart: the gateway learns that a replica died from the call that finds it dead.
    gateway = stack.start_gateway(tokenizer_addresses=[stack.tokenizer.address, second.address],
                                  health_check_interval_s=60, **settings)
    return gateway, second


def test_both_replicas_serve(make_stack):
    stack = make_stack()
    gateway, second = _two_replicas(stack)
    client = gateway.openai()
    for _ in range(4):
        list(client.completions.create(model="fake-model", prompt="x 10", max_tokens=3, stream=True))
    assert stack.tokenizer.servicer.calls["Tokenize"] > 0 and second.servicer.calls["Tokenize"] > 0


def test_a_dead_replica_costs_no_request(make_stack):
    stack = make_stack()
    gateway, second = _two_replicas(stack)
    client = gateway.openai()
    assert client.completions.create(model="fake-model", prompt="x 10", max_tokens=3).choices[0].text
    stack.loop.run(second.stop())
    before = _all_retries()
    for i in range(6):  # in turn, so some calls go to the dead replica first
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="fake-model", prompt=f"x {10 + i}", max_tokens=3, stream=True))
        assert streamed == fakes.decode_text(fakes.expected_tokens([10 + i], 3))
        chat = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
        assert chat.choices[0].message.content is not None
    assert _all_retries() > before  # counted
    dead = [w for w in gateway.gateway.pool.workers("tokenizer") if w.address == second.address]
    assert not dead[0].healthy and "UNAVAILABLE" in dead[0].why_unhealthy
    with gateway.http_client() as http:
        assert http.get("/health").json() == {"status": "ok"}  # one replica is enough


def test_a_refused_request_is_not_retried(make_stack):
    stack = make_stack()
    gateway, _ = _two_replicas(stack)
    before = _all_retries()
    with gateway.http_client() as http:
        response = http.post("/v1/completions", json={"prompt": "INVALID text", "max_tokens": 2})
    assert response.status_code == 400
    assert _all_retries() == before
    assert all(w.healthy for w in gateway.gateway.pool.workers("tokenizer"))


def test_with_every_replica_down_requests_fail_with_503(make_stack):
    stack = make_stack()
    gateway, second = _two_replicas(stack)
    stack.loop.run(second.stop())
    stack.loop.run(stack.tokenizer.stop())
    with gateway.http_client() as http:
        response = http.post("/v1/completions", json={"prompt": "x 10", "max_tokens": 2})
    assert response.status_code == 503, response.text
