"""A worker announced in Redis gets requests only after it proves it holds the cluster token (real Redis, fake
workers speaking the real protos): writing to the registry is not enough to receive user traffic."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from splitserve.membership import is_member, membership_mac, new_nonce
from splitserve.v1 import common_pb2, decode_pb2_grpc
from splitserve.worker_registry import WorkerAnnouncer

from . import fakes

TOKEN = "cluster-token-for-tests"


def _rejections(reason: str, kind: str = "decode") -> float:
    return REGISTRY.get_sample_value("splitserve_gateway_worker_rejections_total",
                                     {"kind": kind, "reason": reason}) or 0.0


class RelayDecode(fakes.FakeDecode):
    """An impostor that has no token but passes each challenge on to a real worker and returns its answer."""

    target: str = ""

    async def Stats(self, request, context):
        async with grpc.aio.insecure_channel(self.target) as channel:
            return await decode_pb2_grpc.DecodeStub(channel).Stats(request, timeout=5)


def relay_server(target: str) -> fakes.FakeServer:
    servicer = RelayDecode()
    servicer.target = target
    return fakes.FakeServer(servicer, decode_pb2_grpc.add_DecodeServicer_to_server)


def _announce(stack, redis_url: str, *servers) -> list[WorkerAnnouncer]:
    announcers = [WorkerAnnouncer(redis_url, "decode", s.address, "fake-model", dict, interval_s=0.1)
                  for s in servers]
    for announcer in announcers:
        stack.loop.run(announcer.start())
    return announcers


def _stop(stack, announcers) -> None:
    for announcer in announcers:
        stack.loop.run(announcer.stop())


def test_mac_binds_nonce_kind_address_model_and_health_address():
    nonce = new_nonce()
    mac = membership_mac(TOKEN, nonce, "decode", "10.0.0.1:1", "m", "10.0.0.1:2")
    assert is_member(TOKEN, nonce, "decode", "10.0.0.1:1", "m", mac, "10.0.0.1:2")
    for changed in [("other-token", nonce, "decode", "10.0.0.1:1", "m", mac, "10.0.0.1:2"),
                    (TOKEN, new_nonce(), "decode", "10.0.0.1:1", "m", mac, "10.0.0.1:2"),
                    (TOKEN, nonce, "prefill", "10.0.0.1:1", "m", mac, "10.0.0.1:2"),
                    (TOKEN, nonce, "decode", "10.0.0.2:1", "m", mac, "10.0.0.1:2"),
                    (TOKEN, nonce, "decode", "10.0.0.1:1", "m2", mac, "10.0.0.1:2"),
                    (TOKEN, nonce, "decode", "10.0.0.1:1", "m", mac, "10.0.0.9:2")]:
        assert not is_member(*changed)


def test_impostors_announced_in_redis_get_no_requests_and_members_get_them_all(make_stack, clean_redis):
    stack = make_stack(num_prefill=0, num_decode=0)
    member = stack.start_server(fakes.decode_server, cluster_token=TOKEN)
    no_token = stack.start_server(fakes.decode_server)
    wrong_token = stack.start_server(fakes.decode_server, cluster_token="a guess")
    other_model = stack.start_server(fakes.decode_server, cluster_token=TOKEN, model="other-model")
    relay = stack.start_server(relay_server, target=member.address)
    impostors = [no_token, wrong_token, other_model, relay]
    before = {reason: _rejections(reason) for reason in ("no_proof", "bad_proof", "model_mismatch",
                                                          "address_mismatch")}
    announcers = _announce(stack, clean_redis, member, *impostors)
    try:
        gateway = stack.start_gateway(static_workers=False, redis_url=clean_redis, cluster_token=TOKEN)
        pool = gateway.gateway.pool
        assert {w.address for w in pool.workers("decode")} == {s.address for s in (member, *impostors)}
        assert [w.address for w in pool.healthy("decode")] == [member.address]
        for _ in range(12):
            result = gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2)
            assert result.choices[0].text == " w11 w12"
        assert len(member.servicer.requests) == 12
        assert all(s.servicer.requests == [] for s in impostors)
        assert all(s.servicer.stats_calls >= 1 for s in (no_token, wrong_token, other_model))  # each was asked
        why = {w.address: w.why_unhealthy for w in pool.workers("decode")}
        assert "no_proof" in why[no_token.address] and "bad_proof" in why[wrong_token.address]
        assert "model_mismatch" in why[other_model.address] and "address_mismatch" in why[relay.address]
        for reason, count in before.items():
            assert _rejections(reason) > count, reason
    finally:
        _stop(stack, announcers)


def test_without_a_token_discovered_workers_are_still_checked_for_their_model(make_stack, clean_redis):
    stack = make_stack(num_prefill=0, num_decode=0)
    right = stack.start_server(fakes.decode_server)
    wrong = stack.start_server(fakes.decode_server, model="other-model")
    announcers = _announce(stack, clean_redis, right, wrong)
    try:
        gateway = stack.start_gateway(static_workers=False, redis_url=clean_redis)
        assert [w.address for w in gateway.gateway.pool.healthy("decode")] == [right.address]
    finally:
        _stop(stack, announcers)


def test_configured_workers_prove_themselves_once_a_token_is_set(make_stack):
    stack = make_stack(num_prefill=0, num_decode=2)
    member, outsider = stack.decodes
    member.servicer.cluster_token = TOKEN
    gateway = stack.start_gateway(cluster_token=TOKEN)
    assert [w.address for w in gateway.gateway.pool.healthy("decode")] == [member.address]
    for _ in range(4):
        gateway.openai().completions.create(model="fake-model", prompt="x 10", max_tokens=2)
    assert len(member.servicer.requests) == 4 and outsider.servicer.requests == []


def test_a_worker_proves_itself_again_after_it_was_down(make_stack):
    stack = make_stack(num_prefill=0, num_decode=1, decode={"cluster_token": TOKEN})
    gateway = stack.start_gateway(cluster_token=TOKEN)
    pool = gateway.gateway.pool
    [worker] = pool.workers("decode")
    assert worker.healthy and worker.admitted
    calls = stack.decode.stats_calls
    stack.loop.run(pool.refresh())
    assert stack.decode.stats_calls == calls          # proven once, not on every check
    pool.mark_failed(worker, "UNAVAILABLE: test")
    assert not worker.admitted
    stack.loop.run(pool.refresh())
    assert worker.healthy and stack.decode.stats_calls == calls + 1


def test_an_admitted_worker_is_checked_on_its_health_thread(make_stack):
    stack = make_stack(num_prefill=0, num_decode=1, decode={"cluster_token": TOKEN})
    health_thread = stack.start_server(fakes.tokenizer_server)   # stands in for the worker's health-only server
    stack.decode.health_address = health_thread.address
    gateway = stack.start_gateway(cluster_token=TOKEN)
    pool = gateway.gateway.pool
    [worker] = pool.workers("decode")
    assert worker.healthy and worker.health_channel is not None
    # The main port's answer no longer decides (a busy loop answers it late); the health thread's does.
    stack.loop.run(stack.decodes[0].health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    stack.loop.run(pool.refresh())
    assert worker.healthy
    # The health thread gone: the worker is down, and asked on its main port again until it proves itself anew.
    stack.loop.run(health_thread.stop())
    stack.loop.run(pool.refresh())
    assert not worker.healthy and not worker.admitted and worker.health_channel is None
    stack.loop.run(pool.refresh())
    assert not worker.healthy and "NOT_SERVING" in worker.why_unhealthy


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_real_workers_stats_answer_is_checked_like_the_fakes(token):
    """The worker side (WorkerIdentity) answers what the gateway side checks."""
    from splitserve.serving.engine_worker import WorkerIdentity

    identity = WorkerIdentity("decode", "10.0.0.9:5", "m", token, "10.0.0.9:6")
    nonce = new_nonce()
    proof = identity.answer(nonce)
    assert (proof.address, proof.health_address) == ("10.0.0.9:5", "10.0.0.9:6")
    assert bool(proof.mac) == (token is not None)
    if token:
        assert is_member(TOKEN, nonce, "decode", "10.0.0.9:5", "m", proof.mac, "10.0.0.9:6")
    assert identity.answer(b"").mac == b""                          # no challenge, no proof
    assert common_pb2.WorkerStatsResponse(membership=proof).membership.address == "10.0.0.9:5"
