"""The Grafana dashboard asks only for metrics the services export, grouped by labels those metrics carry, and
compose and Kubernetes ship the same dashboard."""

from __future__ import annotations

import collections
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "splitserve.json"
K8S_COPY = ROOT / "deploy" / "k8s" / "base" / "grafana-dashboard.json"
METRIC = re.compile(r"\bsplitserve_[a-z0-9_]+")
GROUPING = re.compile(r"\bby \(([^)]*)\)\s*\(([^()]*\(?\s*(splitserve_[a-z0-9_]+))")
# Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = {"instance", "job"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created")}


def _modules_defining_metrics() -> list[str]:
    """Every product module that declares a prometheus_client metric (found by reading the sources, so that a new
    module is covered without editing this test)."""
    names = []
    for base, package in ((ROOT / "shared" / "splitserve", "splitserve"), (ROOT / "services", "splitserve.services")):
        for path in base.rglob("*.py"):
            if "v1" in path.parts or not re.search(r"\b(Counter|Gauge|Histogram)\(\"splitserve_", path.read_text()):
                continue
            names.append(".".join([package, *path.relative_to(base).with_suffix("").parts]))
    return names


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric a splitserve service can serve on /metrics."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    from splitserve.serving.engine_worker import EngineMetricsCollector
    from splitserve.services.kv_store.metrics import POOL_METRICS

    for module in _modules_defining_metrics():
        importlib.import_module(module)
    series: dict[str, set[str]] = {}

    def add(name: str, kind: str, labels) -> None:
        base = name.removesuffix("_total") if kind == "counter" else name
        for suffix in SUFFIXES[kind]:
            series[base + suffix] = set(labels) | ({"le"} if suffix == "_bucket" else set())

    for collector in list(REGISTRY._collector_to_names):
        if not isinstance(collector, MetricWrapperBase):
            continue  # collectors other tests registered (engines, stores): their names are added below
        labelnames = collector._labelnames
        for family in collector.collect():
            labels = set(labelnames) | {k for s in family.samples for k in s.labels}
            add(family.name, family.type, labels)

    class IdleEngine:
        stats_snapshot = collections.defaultdict(int)

    for family in EngineMetricsCollector(IdleEngine(), "decode").collect():
        add(family.name, family.type, {k for s in family.samples for k in s.labels})
    for family_class, name, _help, _field in POOL_METRICS:
        add(name, family_class("x", "").type, ())
    return series


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    return exported_series()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _expressions(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_queried_metric_is_exported_with_the_labels_it_is_grouped_by(dashboard, series):
    expressions = _expressions(dashboard)
    queried = {name for expr in expressions for name in METRIC.findall(expr)}
    assert queried and queried <= set(series), sorted(queried - set(series))
    for expr in expressions:
        for labels, _inner, name in GROUPING.findall(expr):
            wanted = {label.strip() for label in labels.split(",") if label.strip()}
            assert wanted <= series[name] | SCRAPE_LABELS, (expr, wanted - series[name])


def test_the_dashboard_covers_what_operators_watch(dashboard):
    text = " ".join(_expressions(dashboard))
    for metric in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "generation_tokens",
                   "requests_queued", "kv_cache_usage_ratio", "prefix_cache_hits_tokens", "kv_transfer_bytes",
                   "kv_transfer_failures", "router_decisions", "decode_kv_recompute", "decode_migrations"):
        assert f"splitserve_{metric}" in text or f"splitserve_gateway_{metric}" in text, metric
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "splitserve"


def test_compose_and_kubernetes_ship_the_same_dashboard():
    assert K8S_COPY.read_text() == DASHBOARD.read_text(), (
        "deploy/k8s/base/grafana-dashboard.json is a copy of deploy/grafana/dashboards/splitserve.json (kustomize "
        "reads no file outside its folder): copy it again after changing the original")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/splitserve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    kustomization = yaml.safe_load((ROOT / "deploy/k8s/base/kustomization.yaml").read_text())
    [generated] = [g for g in kustomization["configMapGenerator"] if g["name"] == "grafana-dashboard-splitserve"]
    assert generated["files"] == ["splitserve.json=grafana-dashboard.json"]
    assert generated["options"]["labels"]["grafana_dashboard"] == "1"


def test_the_readme_documents_every_exported_metric(series):
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `(splitserve_[a-z0-9_]+)` \|", readme, flags=re.M))
    # A histogram is documented under its own name; its series add _bucket/_sum/_count.
    histograms = {name.removesuffix("_bucket") for name in series if name.endswith("_bucket")}
    names = histograms | {name for name in series if not name.endswith(("_created", "_bucket", "_sum", "_count"))}
    exported = {name for name in names if name.startswith("splitserve_")}
    assert documented == exported, {"undocumented": sorted(exported - documented),
                                    "not exported": sorted(documented - exported)}
