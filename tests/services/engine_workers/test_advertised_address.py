"""The address a prefill/decode worker announces: replicas from one template (compose --scale, a Deployment) bind a
wildcard and must each announce their own reachable IP, never "0.0.0.0:port"."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from splitserve.serving.addresses import AdvertiseAddressError, advertised_address, host_port, own_ip
from splitserve.serving.engine_worker import EngineMetricsCollector, EngineWorkerSettings, run_engine_worker


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", ""])
def test_a_wildcard_bound_worker_announces_its_own_ip(wildcard):
    assert advertised_address(None, wildcard, 50051, resolve=lambda: "10.1.2.3") == "10.1.2.3:50051"
    assert advertised_address(None, wildcard, 50051, resolve=lambda: "fd00::7") == "[fd00::7]:50051"


def test_an_explicit_advertise_address_or_a_specific_host_is_announced_as_given():
    def unreachable() -> str:
        raise AssertionError("must not resolve the host name")

    assert advertised_address("prefill-0.example:9000", "0.0.0.0", 50051, resolve=unreachable) == \
        "prefill-0.example:9000"
    assert advertised_address(None, "127.0.0.1", 50061, resolve=unreachable) == "127.0.0.1:50061"
    assert host_port("::1", 5) == "[::1]:5"


def test_own_ip_takes_a_routable_address_and_refuses_loopback_only_names():
    assert own_ip("192.0.2.7") == "192.0.2.7"          # what a container's /etc/hosts maps its host name to
    for loopback in ("127.0.0.1", "localhost", "::1"):
        with pytest.raises(AdvertiseAddressError, match="--advertise-address"):
            own_ip(loopback)
    with pytest.raises(AdvertiseAddressError, match="does not resolve"):
        own_ip("no-such-host.invalid")


def test_settings_address_follows_the_bind(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "192.0.2.9")
    assert EngineWorkerSettings(host="0.0.0.0", port=50051).address == "192.0.2.9:50051"
    assert EngineWorkerSettings(host="127.0.0.1", port=50061).address == "127.0.0.1:50061"


def test_a_worker_that_cannot_name_its_address_exits_before_loading_the_model(monkeypatch, caplog):
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")

    def add_servicer(*_args) -> None:
        raise AssertionError("the worker must not get as far as serving")

    settings = EngineWorkerSettings(host="0.0.0.0", port=0, model="/nonexistent/model")
    with caplog.at_level(logging.ERROR):
        assert asyncio.run(run_engine_worker(settings, "prefill", "splitserve.v1.Prefill", add_servicer)) == 2
    assert "--advertise-address" in caplog.text


def test_engine_metrics_export_queued_tokens_for_autoscalers():
    class Engine:
        stats_snapshot = {"running": 1, "waiting": 2, "waiting_tokens": 700, "used_blocks": 3, "num_blocks": 12,
                          "prefix_query_tokens": 0, "prefix_hit_tokens": 0, "preemptions": 0,
                          "kv_load_failures": 0, "attention_compile_fallbacks": 0,
                          "prompt_tokens_computed": 0, "generation_tokens": 0, "steps": 0, "guided_sequences": 0,
                          "guided_rejected_tokens": 0}

    families = {f.name: f for f in EngineMetricsCollector(Engine(), "prefill").collect()}
    sample = families["splitserve_waiting_tokens"].samples[0]
    assert sample.value == 700 and sample.labels == {"role": "prefill"}
    assert families["splitserve_kv_cache_usage_ratio"].samples[0].value == 0.25
