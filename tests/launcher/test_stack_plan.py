"""The command lines `splitserve up` runs, checked without starting anything."""

import itertools

import pytest

from splitserve.launcher.plan import STOP_ORDER, StackConfig, flags, plan_stack


REDIS_PASSWORD = "redis-secret"
CLUSTER_TOKEN = "cluster-secret"


def _plan(tmp_path, **fields):
    config = StackConfig(**{"model": "/models/m", **fields})
    ports = itertools.count(20000)
    plan = plan_stack(config, config.model, tmp_path, ports, redis_binary="/usr/bin/redis-server",
                      envoy_binary="/venv/bin/envoy", service_command=["python", "-m", "splitserve.services.cli"],
                      redis_password=REDIS_PASSWORD, cluster_token=CLUSTER_TOKEN)
    return plan, {spec.name: spec for tier in plan.tiers for spec in tier}


def _flag(argv, name):
    return argv[argv.index(name) + 1]


def test_flags_skip_unset_values_and_join_lists():
    assert flags(model="m", num_kv_blocks=None, prefill_addresses=["a:1", "b:2"]) == [
        "--model", "m", "--prefill-addresses", "a:1,b:2"]


def test_booleans_become_on_off_switches():
    assert flags(kv_checksum=True, envoy=False) == ["--kv-checksum", "--no-envoy"]


def test_kv_data_plane_options_reach_the_store_and_the_engines(tmp_path):
    _, specs = _plan(tmp_path, kv_checksum=True, kv_transport="tcp")
    assert "--kv-checksum" in specs["kv-store"].argv
    for name in ("prefill-0", "decode-0"):
        assert "--kv-checksum" in specs[name].argv and _flag(specs[name].argv, "--kv-transport") == "tcp"
    _, specs = _plan(tmp_path)
    assert not any("--kv-checksum" in spec.argv or "--kv-transport" in spec.argv for spec in specs.values())


def test_the_traces_endpoint_reaches_every_splitserve_process_and_only_when_set(tmp_path):
    _, specs = _plan(tmp_path, otlp_traces_endpoint="http://collector:4318", tokenizer_replicas=2)
    services = [spec for spec in specs.values() if spec.role not in ("redis", "envoy")]
    assert sorted(spec.role for spec in services) == ["decode", "gateway", "kv-store", "prefill", "tokenizer",
                                                      "tokenizer"]
    assert all(_flag(spec.argv, "--otlp-traces-endpoint") == "http://collector:4318" for spec in services)
    _, specs = _plan(tmp_path)
    assert not any("--otlp-traces-endpoint" in spec.argv for spec in specs.values())


def test_start_order_and_roles(tmp_path):
    plan, _ = _plan(tmp_path, prefill_workers=2, decode_workers=3)
    assert [[spec.name for spec in tier] for tier in plan.tiers] == [
        ["redis"], ["tokenizer-0", "tokenizer-1", "kv-store", "prefill-0", "prefill-1", "decode-0", "decode-1",
                    "decode-2"],
        ["gateway"], ["envoy"]]
    assert {role for tier in STOP_ORDER for role in tier} == {spec.role for tier in plan.tiers for spec in tier}


def test_every_service_gets_its_own_ports_on_loopback(tmp_path):
    plan, specs = _plan(tmp_path, prefill_workers=2, decode_workers=2, host="0.0.0.0")
    used = []
    for spec in specs.values():
        if spec.role in ("redis", "envoy"):
            continue
        assert spec.argv[:4] == ["python", "-m", "splitserve.services.cli", spec.role]
        used += [int(_flag(spec.argv, "--port")), int(_flag(spec.argv, "--metrics-port"))]
        if spec.role != "gateway":
            assert _flag(spec.argv, "--host") == "127.0.0.1"
    assert len(used) == len(set(used))
    assert plan.base_url == f"http://127.0.0.1:{plan.envoy_ports.http_port}/v1"  # reachable from this machine
    assert plan.envoy_ports.host == "0.0.0.0"  # Envoy is what listens publicly


def test_workers_and_gateway_are_wired_together(tmp_path):
    plan, specs = _plan(tmp_path, prefill_workers=2, num_kv_blocks=64, torch_threads=3, local_prefill_threshold=32,
                        served_model_name=["tiny", "tiny-alias"], api_key="secret", tool_call_parser="hermes")
    kv_store = specs["kv-store"].address
    for name in ("prefill-0", "prefill-1", "decode-0"):
        argv = specs[name].argv
        assert _flag(argv, "--model") == "/models/m"
        assert _flag(argv, "--kv-store-address") == kv_store
        assert _flag(argv, "--torch-threads") == "3" == specs[name].env["OMP_NUM_THREADS"]
        assert _flag(argv, "--num-kv-blocks") == "64"
    gateway = specs["gateway"]
    assert _flag(gateway.argv, "--prefill-addresses") == f"{specs['prefill-0'].address},{specs['prefill-1'].address}"
    assert _flag(gateway.argv, "--decode-addresses") == specs["decode-0"].address
    assert _flag(gateway.argv, "--tokenizer-addresses") == (
        f"{specs['tokenizer-0'].address},{specs['tokenizer-1'].address}")
    assert _flag(gateway.argv, "--kv-store-address") == kv_store
    assert _flag(gateway.argv, "--local-prefill-threshold") == "32"
    assert _flag(gateway.argv, "--served-model-name") == "tiny,tiny-alias"
    assert _flag(gateway.argv, "--tool-call-parser") == "hermes"
    assert "secret" not in " ".join(gateway.argv)  # visible in `ps`: it goes by env instead
    assert gateway.env["SPLITSERVE_API_KEY"] == "secret"
    assert specs["tokenizer-0"].env["OMP_NUM_THREADS"] == "1"
    assert plan.addresses["prefill"] == [specs["prefill-0"].address, specs["prefill-1"].address]


def test_tokenizer_replicas_each_get_their_own_port(tmp_path):
    plan, specs = _plan(tmp_path, tokenizer_replicas=3)
    tokenizers = [specs[f"tokenizer-{i}"] for i in range(3)]
    assert plan.addresses["tokenizer"] == [t.address for t in tokenizers]
    assert len({t.address for t in tokenizers}) == 3
    assert all(t.role == "tokenizer" for t in tokenizers) and "tokenizer-3" not in specs
    with pytest.raises(ValueError, match="tokenizer_replicas must be >= 1"):
        StackConfig(tokenizer_replicas=0)


def test_the_kv_data_plane_uses_loopback_unless_told_otherwise(tmp_path, monkeypatch):
    """UCX listens on every network device it may use; the stack's internal services listen on loopback only."""
    monkeypatch.delenv("UCX_NET_DEVICES", raising=False)
    _, specs = _plan(tmp_path)
    for name in ("kv-store", "prefill-0", "decode-0"):
        assert specs[name].env["UCX_NET_DEVICES"] == "lo"
    monkeypatch.setenv("UCX_NET_DEVICES", "eth1")
    assert _plan(tmp_path)[1]["kv-store"].env["UCX_NET_DEVICES"] == "eth1"
    assert _plan(tmp_path, ucx_net_devices="mlx5_0:1")[1]["decode-0"].env["UCX_NET_DEVICES"] == "mlx5_0:1"


def test_with_envoy_the_gateway_is_internal_and_envoy_checks_both_public_ports(tmp_path):
    plan, specs = _plan(tmp_path, port=8000, grpc_port=50051)
    gateway, envoy = specs["gateway"], specs["envoy"]
    assert int(_flag(gateway.argv, "--port")) not in (8000, 50051)
    assert (plan.envoy_ports.http_port, plan.envoy_ports.grpc_port) == (8000, 50051)
    assert plan.envoy_ports.gateway_http_port == int(_flag(gateway.argv, "--port"))
    assert plan.envoy_ports.gateway_grpc_port == int(_flag(gateway.argv, "--grpc-port"))
    assert envoy.probes == [("http", "http://127.0.0.1:8000/health"), ("grpc", "127.0.0.1:50051")]
    assert envoy.argv[:3] == ["/venv/bin/envoy", "-c", str(tmp_path / "envoy.yaml")]
    assert plan.base_url == "http://127.0.0.1:8000/v1" and plan.grpc_address == "127.0.0.1:50051"


def test_gateway_replicas_each_get_their_own_ports_behind_envoy(tmp_path):
    plan, specs = _plan(tmp_path, gateways=3, prefill_workers=2, local_prefill_threshold=32,
                        prefill_decider="threshold", prefill_hold_weight=0.5)
    gateways = [specs[f"gateway-{i}"] for i in range(3)]
    assert "gateway" not in specs and [spec.name for spec in plan.tiers[2]] == [g.name for g in gateways]
    ports = [(int(_flag(g.argv, "--port")), int(_flag(g.argv, "--grpc-port"))) for g in gateways]
    assert plan.envoy_ports.gateway_ports == tuple(ports) and len({p for pair in ports for p in pair}) == 6
    assert plan.addresses["gateway"] == [g.address for g in gateways] == [f"127.0.0.1:{grpc}" for _, grpc in ports]
    assert plan.gateway_urls == [f"http://127.0.0.1:{http}/v1" for http, _ in ports]
    # The same wiring for each: workers, Redis (the shared prefix index), secrets by env.
    assert len({tuple(arg for arg in g.argv if not arg.isdigit()) for g in gateways}) == 1
    assert _flag(gateways[1].argv, "--prefill-decider") == "threshold"
    assert _flag(gateways[1].argv, "--prefill-hold-weight") == "0.5"
    assert all(g.env == gateways[0].env and g.env["SPLITSERVE_REDIS_URL"] for g in gateways)
    assert len({g.metrics_port for g in gateways}) == 3
    with pytest.raises(ValueError, match="need Envoy"):
        StackConfig(gateways=2, envoy=False)
    with pytest.raises(ValueError, match="gateways must be >= 1"):
        StackConfig(gateways=0)


def test_without_envoy_the_gateway_takes_the_public_ports(tmp_path):
    plan, specs = _plan(tmp_path, envoy=False, port=8000, grpc_port=50051, host="127.0.0.2")
    gateway = specs["gateway"]
    assert "envoy" not in specs and plan.envoy_ports is None
    assert (_flag(gateway.argv, "--host"), _flag(gateway.argv, "--port"), _flag(gateway.argv, "--grpc-port")) == (
        "127.0.0.2", "8000", "50051")
    assert gateway.probes == [("grpc", "127.0.0.2:50051"), ("http", "http://127.0.0.2:8000/health?all=true")]


def test_an_external_redis_is_used_as_given(tmp_path):
    plan, specs = _plan(tmp_path, redis_url="redis://cache:6379/2")
    assert "redis" not in specs
    assert plan.redis_url == "redis://cache:6379/2"
    assert specs["decode-0"].env["SPLITSERVE_REDIS_URL"] == "redis://cache:6379/2"
    assert plan.redis_config_path is None


def test_redis_needs_a_password_and_secrets_reach_services_by_env_only(tmp_path):
    plan, specs = _plan(tmp_path, api_key="secret")
    assert plan.redis_url.startswith(f"redis://splitserve:{REDIS_PASSWORD}@127.0.0.1:")
    assert specs["redis"].argv[1] == str(plan.redis_config_path) == str(tmp_path / "redis.conf")
    assert specs["redis"].probes == [("redis", plan.redis_url)]
    for name in ("prefill-0", "decode-0", "gateway"):
        assert specs[name].env["SPLITSERVE_REDIS_URL"] == plan.redis_url
        assert specs[name].env["SPLITSERVE_CLUSTER_TOKEN"] == CLUSTER_TOKEN
    for spec in specs.values():  # command lines are visible to every user of the machine (`ps`)
        assert "--redis-url" not in spec.argv
        assert all(REDIS_PASSWORD not in arg and CLUSTER_TOKEN not in arg for arg in spec.argv)
    for name in ("tokenizer-0", "tokenizer-1", "kv-store"):  # they do not use Redis or the token
        assert "SPLITSERVE_CLUSTER_TOKEN" not in specs[name].env
    with pytest.raises(ValueError, match="redis_password"):
        plan_stack(StackConfig(model="m"), "m", tmp_path, itertools.count(20000), redis_binary="r",
                   envoy_binary="e")


def test_extra_args_reach_only_their_role(tmp_path):
    config = StackConfig(model="m")
    plan = plan_stack(config, "m", tmp_path, itertools.count(20000), redis_binary="r", envoy_binary="e",
                      extra_args={"decode": ["--max-model-len", "512"]}, redis_password="p")
    specs = {spec.name: spec for tier in plan.tiers for spec in tier}
    assert specs["decode-0"].argv[-2:] == ["--max-model-len", "512"]
    assert "--max-model-len" not in specs["prefill-0"].argv


@pytest.mark.parametrize("bad", [dict(prefill_workers=-1), dict(decode_workers=0), dict(port=70000),
                                 dict(torch_threads=0), dict(kv_transport="rdma")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        StackConfig(**bad)


def test_envoy_has_an_admin_interface_only_when_asked(tmp_path):
    plan, _ = _plan(tmp_path)
    assert plan.envoy_ports.admin_port is None
    plan, _ = _plan(tmp_path, envoy_admin_port=9901)
    assert plan.envoy_ports.admin_port == 9901


def test_every_engine_setting_reaches_the_engine_workers_from_one_declaration(tmp_path):
    """StackConfig and the workers' settings extend EngineConfig: a setting declared there is a flag of
    `splitserve up` and of each worker, and the launcher passes on exactly the ones changed from the default."""
    from splitserve.config import EngineConfig
    from splitserve.serving.settings import parse_settings
    from splitserve.services.decode.server import DecodeSettings

    _, specs = _plan(tmp_path, max_model_len=512, enable_prefix_caching=False, attention_backend="torch",
                     num_kv_blocks=64)
    for name in ("prefill-0", "decode-0"):
        argv = specs[name].argv
        assert _flag(argv, "--max-model-len") == "512" and _flag(argv, "--attention-backend") == "torch"
        assert "--no-enable-prefix-caching" in argv and _flag(argv, "--num-kv-blocks") == "64"
        assert "--block-size" not in argv  # left at its default: the worker's own default applies
        parsed = parse_settings(DecodeSettings, argv[argv.index(name.split("-")[0]) + 1:])
        assert parsed.engine_config() == EngineConfig(model="/models/m", max_model_len=512,
                                                      enable_prefix_caching=False, attention_backend="torch",
                                                      num_kv_blocks=64)
    assert "--max-model-len" not in specs["tokenizer-0"].argv
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        StackConfig(block_size=3)
