"""deploy/k8s, checked offline (there is no cluster here): every overlay renders with `kubectl kustomize`, every
object validates against the Kubernetes schemas (kubernetes-validate; KEDA's ScaledObject against a small schema
of its own below), the security and network rules hold, and the rendered env, ports and probes are what each
service actually reads (its settings dataclass parses the rendered env, as it would in the pod)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from splitserve.serving.addresses import WILDCARD_HOSTS
from splitserve.serving.settings import ENV_PREFIX, env_name, parse_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
NAMESPACE = "splitserve"
WORKLOADS = ("Deployment", "StatefulSet")
# The oldest Kubernetes these manifests need (gRPC probes: 1.27 GA; NetworkPolicy endPort: 1.25), and the newest
# schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "latest")
# Pods as clients and servers in the network rules, by their app.kubernetes.io/name.
PODS = ("envoy", "gateway", "tokenizer", "kv-store", "prefill", "decode", "redis")


def _settings_class(role: str):
    from splitserve.services.decode.server import DecodeSettings
    from splitserve.services.gateway.server import GatewaySettings
    from splitserve.services.kv_store.server import KVStoreSettings
    from splitserve.services.prefill.server import PrefillSettings
    from splitserve.services.tokenizer.server import TokenizerSettings

    return {"tokenizer": TokenizerSettings, "kv-store": KVStoreSettings, "prefill": PrefillSettings,
            "decode": DecodeSettings, "gateway": GatewaySettings}[role]


@functools.lru_cache(maxsize=None)
def _render(overlay: str) -> tuple:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations)")
    result = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def rendered(request):
    return _render(request.param)


def _find(objects, kind, name=None):
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _one(objects, kind, name):
    [found] = _find(objects, kind, name)
    return found


def _workloads(objects):
    return [o for o in objects if o["kind"] in WORKLOADS]


def _pod_name(workload) -> str:
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def _container(workload):
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return container


def _ports(container) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def test_the_overlays_are_there():
    assert {"gpu", "cpu", "gpu-hpa-external-redis"} <= set(OVERLAYS)


def test_every_overlay_renders_every_service(rendered):
    deployments = {o["metadata"]["name"] for o in _find(rendered, "Deployment")}
    assert deployments == {"envoy", "gateway", "tokenizer", "kv-store", "prefill", "decode"}
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


def test_the_envoy_config_is_the_shared_one():
    """kustomize reads no file outside its folder, so base/ holds a copy: `cp shared/splitserve/launcher/envoy.yaml
    deploy/k8s/base/envoy-config.yaml` after changing the original."""
    shared = (ROOT / "shared" / "splitserve" / "launcher" / "envoy.yaml").read_text()
    assert (K8S / "base" / "envoy-config.yaml").read_text() == shared


# --- schemas ----------------------------------------------------------------------------------------------------

# KEDA's CRDs are not in the Kubernetes schemas: the fields used here, checked for shape and type.
_SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"behavior": {"type": "object"},
                                                                     "name": {"type": "string"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"const": "prometheus"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "name": {"type": "string"},
                        "metadata": {
                            "type": "object", "required": ["serverAddress", "query", "threshold"],
                            # KEDA reads trigger metadata as strings only.
                            "additionalProperties": {"type": "string"},
                            "properties": {"serverAddress": {"type": "string", "pattern": "^https?://"},
                                           "threshold": {"type": "string", "pattern": r"^[0-9.]+$"},
                                           "activationThreshold": {"type": "string", "pattern": r"^[0-9.]+$"}}},
                    }}},
            }},
    },
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_schemas(rendered, version):
    import jsonschema
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    for obj in rendered:
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, _SCALED_OBJECT_SCHEMA)
            behavior = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
            if behavior:  # KEDA hands this to the HPA it makes: the HPA's own schema applies
                kubernetes_validate.validate(
                    {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                     "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 2,
                              "behavior": behavior}}, version, strict=True)
        else:
            kubernetes_validate.validate(obj, version, strict=True)


# --- security rules (what checkov's Kubernetes checks ask, held here without checkov) --------------------------

def test_pods_run_unprivileged_with_limits_and_probes(rendered):
    for workload in _workloads(rendered):
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostIPC", "hostPID")), name
        assert not any("hostPath" in v for v in pod.get("volumes", [])), name
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"] and "add" not in security["capabilities"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            image, _, tag = container["image"].rpartition(":")
            assert image and tag and "latest" not in tag, f"{where}: pin the image tag ({container['image']})"
            assert container["imagePullPolicy"] == "Always", where
        main = _container(workload)
        assert "readinessProbe" in main and "livenessProbe" in main, name


def test_the_splitserve_images_are_one_release(rendered):
    pods = [w["spec"]["template"]["spec"] for w in _workloads(rendered)]
    tags = {c["image"] for pod in pods for c in [*pod["containers"], *pod.get("initContainers", [])]
            if c["image"].startswith("splitserve/")}
    assert len({image.rsplit(":", 1)[1] for image in tags}) == 1, tags


def test_every_workload_has_a_disruption_budget(rendered):
    budgets = [pdb["spec"]["selector"]["matchLabels"] for pdb in _find(rendered, "PodDisruptionBudget")]
    for workload in _workloads(rendered):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(selector.items() <= labels.items() for selector in budgets), workload["metadata"]["name"]


def test_secrets_come_from_secrets_never_from_literals(rendered):
    """The cluster token, API key and Redis password reach the pods from Secret splitserve-secrets only."""
    for workload in _workloads(rendered):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for var in container.get("env", []):
                if var["name"].endswith(("TOKEN", "API_KEY", "PASSWORD")) or var["name"] == "REDISCLI_AUTH":
                    assert var["valueFrom"]["secretKeyRef"]["name"] == "splitserve-secrets", var["name"]
    assert not _find(rendered, "Secret"), "a Secret in the manifests would ship its value in git"


# --- network rules ----------------------------------------------------------------------------------------------

def _labels_of(rendered, pod: str) -> dict:
    [workload] = [w for w in _workloads(rendered) if _pod_name(w) == pod]
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _port_allowed(ports, port: int) -> bool:
    return not ports or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)


def _reachable(rendered, client: str, server: str, port: int) -> bool:
    """Whether the NetworkPolicies let pod `client` (same namespace) connect to pod `server` on `port`."""
    target, source = _labels_of(rendered, server), _labels_of(rendered, client)
    policies = [p for p in _find(rendered, "NetworkPolicy") if _selects(p["spec"]["podSelector"], target)
                and "Ingress" in p["spec"]["policyTypes"]]
    assert policies, f"{server} is selected by no NetworkPolicy: everything may reach it"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            same_namespace_pod = peers is None or any(
                "podSelector" in peer and "namespaceSelector" not in peer and _selects(peer["podSelector"], source)
                for peer in peers)
            if same_namespace_pod and _port_allowed(rule.get("ports"), port):
                return True
    return False


def _ucx_ports(rendered) -> range:
    low, high = _one(rendered, "ConfigMap", "splitserve-ucx")["data"]["UCX_TCP_PORT_RANGE"].split("-")
    return range(int(low), int(high) + 1)


def test_only_the_gateway_reaches_workers_and_tokenizer_and_only_workers_the_kv_store(rendered):
    pods = [p for p in PODS if any(_pod_name(w) == p for w in _workloads(rendered))]
    ucx = _ucx_ports(rendered)
    allowed = {("envoy", 8000): set(pods), ("envoy", 50051): set(pods),
               ("gateway", 8080): {"envoy"}, ("gateway", 50051): {"envoy"},
               ("tokenizer", 50051): {"gateway"},
               ("prefill", 50051): {"gateway"}, ("decode", 50051): {"gateway"},
               ("prefill", 50052): {"gateway"}, ("decode", 50052): {"gateway"},
               ("prefill", ucx[0]): {"kv-store"}, ("decode", ucx[-1]): {"kv-store"},
               ("kv-store", 50051): {"prefill", "decode"}, ("kv-store", ucx[0]): {"prefill", "decode"},
               ("kv-store", ucx[-1]): {"prefill", "decode"},
               ("redis", 6379): {"gateway", "prefill", "decode", "kv-store"}}
    for (server, port), clients in allowed.items():
        if server not in pods:
            continue  # components/external-redis: no Redis pod
        reaching = {client for client in pods if client != server and _reachable(rendered, client, server, port)}
        assert reaching == clients - {server}, f"{server}:{port} reached by {reaching}"
    for server in set(pods) - {"envoy"}:
        for port in (9100, 9999):  # metrics: Prometheus's namespace only; anything else: nobody
            assert not any(_reachable(rendered, client, server, port) for client in pods), f"{server}:{port}"


def test_ucx_listens_where_the_policies_open(rendered):
    """UCX's tcp transport listens on the pod device on a port of UCX_TCP_PORT_RANGE: every UCX pod gets the
    range and the policies open exactly it."""
    ucx = _ucx_ports(rendered)
    for pod in ("kv-store", "prefill", "decode"):
        [workload] = [w for w in _workloads(rendered) if _pod_name(w) == pod]
        sources = [s["configMapRef"]["name"] for s in _container(workload).get("envFrom", [])]
        assert "splitserve-ucx" in sources, pod
        assert not _reachable(rendered, "kv-store" if pod != "kv-store" else "prefill", pod, ucx[-1] + 1)


# --- what the services read -------------------------------------------------------------------------------------

_SECRET_STAND_IN = "s3cr3t"


def _container_env(rendered, container) -> dict[str, str]:
    """The environment the kubelet would give the container: envFrom ConfigMaps, then env in order with $(VAR)
    expanded; Secrets stand in as a placeholder (their values are not in the manifests)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_one(rendered, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = _one(rendered, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in var["valueFrom"]:
            env[var["name"]] = _SECRET_STAND_IN
    return env


def _service_settings(rendered, workload, monkeypatch):
    """(role, env, settings): the settings the service's own parser makes of the rendered environment."""
    container = _container(workload)
    assert container["command"][0] == "splitserve"
    role = container["command"][1]
    env = _container_env(rendered, container)
    cls = _settings_class(role)
    fields = {env_name(f) for f in cls.__dataclass_fields__}
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - fields
    assert not unknown, f"{role} reads no {unknown}"
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return role, env, parse_settings(cls, [])


def _service_port(rendered, address: str) -> tuple[dict, int]:
    """The Deployment behind `host:port` of a Service, and the container port the Service sends it to."""
    host, port = address.rsplit(":", 1)
    service = _one(rendered, "Service", host)
    [mapping] = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
    [workload] = [w for w in _workloads(rendered)
                  if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    return workload, _ports(_container(workload))[mapping["targetPort"]]


def test_rendered_env_ports_and_probes_agree_with_the_services_settings(rendered, monkeypatch):
    listening = {}
    for workload in _find(rendered, "Deployment"):
        if _pod_name(workload) == "envoy":
            continue
        role, env, settings = _service_settings(rendered, workload, monkeypatch)
        container, spec = _container(workload), workload["spec"]["template"]["spec"]
        assert role == _pod_name(workload) and container["image"].startswith(f"splitserve/{role}:")
        dockerfile = (ROOT / "services" / role.replace("-", "_") / "Dockerfile").read_text()
        assert f'CMD {container["command"]}'.replace("'", '"') in dockerfile
        ports = _ports(container)
        assert settings.host in WILDCARD_HOSTS and ports["metrics"] == settings.metrics_port, role
        grpc_port = settings.grpc_port if role == "gateway" else settings.port
        assert ports["grpc"] == grpc_port, role
        listening[role] = ports
        assert container["readinessProbe"].get("grpc", {}).get("port", grpc_port) == grpc_port, role
        if role == "gateway":
            assert ports["http"] == settings.port
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        if role in ("prefill", "decode"):
            assert "SPLITSERVE_ADVERTISE_ADDRESS" not in env, "every replica would announce one address"
            assert ports["health"] == settings.health_port == container["livenessProbe"]["grpc"]["port"]
        else:
            assert container["livenessProbe"]["grpc"]["port"] == grpc_port, role
        if "startupProbe" in container:
            assert container["startupProbe"]["grpc"]["port"] == grpc_port, role
        # The drain fits in the grace period, after the preStop pause.
        pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        assert spec["terminationGracePeriodSeconds"] >= pause + settings.grace_s + 5, role
        if getattr(settings, "model", None):
            mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "models"}
            assert any(settings.model.startswith(mount + "/") for mount in mounts), role
        if role == "kv-store":
            assert _memory_bytes(container["resources"]["requests"]["memory"]) > settings.capacity_bytes
        # Every address a service is given leads, through a Service, to the port the other one listens on.
        for address in [*getattr(settings, "tokenizer_addresses", []), getattr(settings, "kv_store_address", None)]:
            if address:
                target, port = _service_port(rendered, address)
                _, _, target_settings = _service_settings(rendered, target, monkeypatch)
                assert port == target_settings.port, address
                monkeypatch.undo()
        redis = getattr(settings, "redis_url", None)
        if role in ("gateway", "prefill", "decode", "kv-store"):
            # The kv-store publishes KV events only: it takes no requests, so it proves no membership.
            assert redis and getattr(settings, "cluster_token", _SECRET_STAND_IN) == _SECRET_STAND_IN, role
            if _find(rendered, "StatefulSet", "redis"):
                assert redis == f"redis://splitserve:{_SECRET_STAND_IN}@redis:6379/0"
                _, port = _service_port(rendered, "redis:6379")
                assert port == 6379
        monkeypatch.undo()
    assert set(listening) == {"gateway", "tokenizer", "kv-store", "prefill", "decode"}


def _memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) * units.get(unit, 1)


def test_envoy_listens_and_routes_where_the_gateway_serves(rendered):
    from splitserve.launcher.envoy import GRPC_CLUSTER, GRPC_LISTENER, HTTP_CLUSTER, HTTP_LISTENER

    config = yaml.safe_load(_one(rendered, "ConfigMap", _envoy_config_map(rendered))["data"]["envoy.yaml"])
    listeners = {listener["name"]: listener["address"]["socket_address"]["port_value"]
                 for listener in config["static_resources"]["listeners"]}
    envoy = _container(_one(rendered, "Deployment", "envoy"))
    assert _ports(envoy) == {"http": listeners[HTTP_LISTENER], "grpc": listeners[GRPC_LISTENER]}
    endpoints = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                 ["socket_address"] for c in config["static_resources"]["clusters"]}
    assert {c["type"] for c in config["static_resources"]["clusters"]} == {"STRICT_DNS"}
    gateway_service = _one(rendered, "Service", "gateway")
    assert gateway_service["spec"]["clusterIP"] == "None", "STRICT_DNS must see each gateway pod, not one VIP"
    gateway = _ports(_container(_one(rendered, "Deployment", "gateway")))
    for cluster, port_name in ((HTTP_CLUSTER, "http"), (GRPC_CLUSTER, "grpc")):
        assert endpoints[cluster]["address"] == "gateway"
        assert endpoints[cluster]["port_value"] == gateway[port_name]


def _envoy_config_map(rendered) -> str:
    [volume] = [v for v in _one(rendered, "Deployment", "envoy")["spec"]["template"]["spec"]["volumes"]
                if "configMap" in v]
    return volume["configMap"]["name"]


# --- autoscaling ------------------------------------------------------------------------------------------------

def _exported_engine_metrics() -> set[str]:
    """The metric names an engine worker serves (its collector, run on an engine whose counters are all 0)."""
    import collections

    from splitserve.serving.engine_worker import EngineMetricsCollector

    class Engine:
        stats_snapshot = collections.defaultdict(int)

    return {family.name for family in EngineMetricsCollector(Engine(), "decode").collect()}


def test_autoscalers_target_the_workers_on_metrics_they_export(rendered):
    exported = _exported_engine_metrics()
    deployments = {d["metadata"]["name"]: d for d in _find(rendered, "Deployment")}
    scalers = _find(rendered, "ScaledObject") + _find(rendered, "HorizontalPodAutoscaler")
    assert len(scalers) in (0, 2)
    for scaler in scalers:
        target = scaler["spec"]["scaleTargetRef"]["name"]
        assert target in ("prefill", "decode") and "replicas" not in deployments[target]["spec"], target
        if scaler["kind"] == "ScaledObject":
            queries = [trigger["metadata"]["query"] for trigger in scaler["spec"]["triggers"]]
            names = {name for query in queries for name in re.findall(r"splitserve_\w+", query)}
            for trigger in scaler["spec"]["triggers"]:
                assert f'role="{target}"' in trigger["metadata"]["query"], trigger
        else:
            names = {m["pods"]["metric"]["name"] for m in scaler["spec"]["metrics"]}
        assert names and names <= exported, names - exported
    by_target = {s["spec"]["scaleTargetRef"]["name"]: s for s in scalers}
    if by_target:
        assert "splitserve_waiting_tokens" in str(by_target["prefill"])
        assert "splitserve_running_requests" in str(by_target["decode"])
        assert "splitserve_kv_cache_usage_ratio" in str(by_target["decode"])


def test_prefill_and_decode_ask_for_different_gpus_and_the_store_for_a_large_ram_node():
    objects = _render("gpu")
    pods = {name: _one(objects, "Deployment", name)["spec"]["template"]["spec"] for name in ("prefill", "decode")}
    for name, pod in pods.items():
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1", name
    assert pods["prefill"]["nodeSelector"] != pods["decode"]["nodeSelector"]
    store = _one(objects, "Deployment", "kv-store")["spec"]["template"]["spec"]
    assert store["nodeSelector"] == {"splitserve.io/memory-tier": "large"}
    for name in ("envoy", "gateway", "tokenizer", "kv-store"):
        assert "nvidia.com/gpu" not in str(_one(objects, "Deployment", name)), name
    assert "nvidia.com/gpu" not in str(_render("cpu"))


# --- checkov ----------------------------------------------------------------------------------------------------

# Checks the manifests fail on purpose, and why.
ACCEPTED_CHECKOV = {
    "CKV_K8S_43": "images by digest: the splitserve images are built by whoever deploys them, so their digests "
                  "cannot be written here; pin them with `kustomize edit set image splitserve/x@sha256:...`",
    "CKV_K8S_35": "secrets as env: every service reads its secrets from SPLITSERVE_* env (README: Trust model); "
                  "they never appear on a command line",
}


def _checkov():
    beside = Path(os.environ.get("CHECKOV", ""))
    return str(beside) if beside.is_file() else shutil.which("checkov")


@pytest.mark.slow
def test_checkov_finds_nothing_but_the_accepted(tmp_path):
    checkov = _checkov()
    if checkov is None:
        pytest.skip("checkov is not installed (pipx install checkov, or set CHECKOV to its path)")
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(_render(overlay)))
    result = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
                             "--skip-check", ",".join(ACCEPTED_CHECKOV), "-o", "cli"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Passed checks" in result.stdout or result.stdout.strip() == "", result.stdout[-2000:]
