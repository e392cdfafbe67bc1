"""deploy/: the Kubernetes manifests, the prometheus-adapter rule and the Grafana dashboard.

No cluster: the core kinds are validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), the ServiceMonitor CRD against a small schema
here, and everything is checked against hearth itself: the metric names /metrics exports, the
routes the app serves, the container args hearth's CLI parses, the ConfigMap's models.yaml.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from hearth.cli import build_parser
from hearth.engine.config import parse_config
from hearth.server.app import create_app
from hearth.server.lifecycle import DrainingServer
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "hearth-dashboard.json"
ADAPTER = ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to fit

SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^\d+[smh]$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes by kind (one object per kind there)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_all(path):
            assert doc["kind"] not in objects, f"{path.name}: a second {doc['kind']}"
            objects[doc["kind"]] = doc
    return objects


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return manifests()


@pytest.fixture(scope="module")
def app_client() -> TestClient:
    """The app over a fake engine, after one chat request (so the labelled series exist)."""
    registry = ModelRegistry()
    registry.add(FakeEngine())
    registry.mark_ready()
    client = TestClient(create_app(registry, ServerSettings()))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json={**body, "max_tokens": 3}).status_code == 200
    return client


@pytest.fixture(scope="module")
def exported(app_client: TestClient) -> set[str]:
    """The sample names /metrics exports (counters' _total, histograms' _bucket/_sum/_count)."""
    page = app_client.get("/metrics").text
    return {s.name for family in text_string_to_metric_families(page) for s in family.samples}


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads: hearth_* names, and any name before a
    selector's braces (so that a series of another exporter would be noticed too)."""
    names = set(re.findall(r"\bhearth_[a-zA-Z0-9_]+", promql))
    names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", promql))
    return names - {"by", "without"}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(variable["query"]["query"])
    return exprs


def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    [hearth] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return hearth


def test_every_yaml_parses_and_kustomization_lists_the_core_files() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    for path in [*K8S.glob("*.yaml"), ADAPTER]:
        assert load_all(path), f"{path.name} is empty"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(set(files) - {"kustomization.yaml", "download-job.yaml"})
    assert all((K8S / name).is_file() for name in listed)


def test_core_kinds_validate_against_the_kubernetes_schemas(
    objects: dict[str, dict[str, Any]],
) -> None:
    core = {k: v for k, v in objects.items() if k not in ("Kustomization", "ServiceMonitor")}
    assert set(core) == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Job",
    }
    for kind, obj in core.items():
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{kind}: {exc.message} at {'/'.join(map(str, exc.path))}")


def test_the_validator_catches_a_bad_manifest(objects: dict[str, dict[str, Any]]) -> None:
    """The schema check has teeth: a misspelt field and a wrongly typed one are refused."""
    bad = json.loads(json.dumps(objects["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(objects["HorizontalPodAutoscaler"]))
    bad["spec"]["maxReplicas"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_service_monitor_validates_and_scrapes_the_service(
    objects: dict[str, dict[str, Any]], app_client: TestClient
) -> None:
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        broken = {**monitor, "spec": {**monitor["spec"], "endpoint": []}}
        jsonschema.validate(broken, SERVICE_MONITOR_SCHEMA)
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert app_client.get(endpoint["path"]).status_code == 200


def test_objects_refer_to_each_other(objects: dict[str, dict[str, Any]]) -> None:
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    hearth = container(objects)
    container_ports = {p["name"]: p["containerPort"] for p in hearth["ports"]}
    [port] = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] in container_ports
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["models"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    claim = objects["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["hf-cache"]["persistentVolumeClaim"]["claimName"] == claim
    job_volumes = objects["Job"]["spec"]["template"]["spec"]["volumes"]
    assert job_volumes[0]["persistentVolumeClaim"]["claimName"] == claim
    assert {m["name"] for m in hearth["volumeMounts"]} <= set(volumes)


def test_deployment_asks_for_a_gpu_and_reads_the_cache_offline(
    objects: dict[str, dict[str, Any]],
) -> None:
    hearth = container(objects)
    assert hearth["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert hearth["resources"]["requests"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in hearth["env"]}
    mounts = {m["name"]: m["mountPath"] for m in hearth["volumeMounts"]}
    assert env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["HF_HOME"]["value"] == mounts["hf-cache"]
    assert env["HEARTH_CACHE_DIR"]["value"].startswith(mounts["hf-cache"] + "/")
    secret = env["HEARTH_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert secret["optional"] is True  # the Secret is the user's to create, or not


def test_container_args_parse_with_hearths_cli(objects: dict[str, dict[str, Any]]) -> None:
    hearth = container(objects)
    assert hearth["command"] == ["hearth"]
    args = build_parser().parse_args(hearth["args"])
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    port = {p["name"]: p["containerPort"] for p in hearth["ports"]}["http"]
    assert args.port == port
    mounts = {m["name"]: m["mountPath"] for m in hearth["volumeMounts"]}
    [(key, text)] = objects["ConfigMap"]["data"].items()
    assert args.config == f"{mounts['models']}/{key}"
    config = parse_config(yaml.safe_load(text), key)
    assert config.models and all(m.device in ("cuda", "auto") for m in config.models)

    # the pod outlives hearth's drain: preStop, then drain, then the abort grace, then SIGKILL
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    pre_stop = hearth["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + args.drain_timeout + DrainingServer.abort_grace
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_probes_point_at_routes_the_app_serves(
    objects: dict[str, dict[str, Any]], app_client: TestClient
) -> None:
    hearth = container(objects)
    ports = {p["name"] for p in hearth["ports"]}
    probes = {k: hearth[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        assert probe["httpGet"]["port"] in ports, name
        assert app_client.get(probe["httpGet"]["path"]).status_code == 200, name
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health"
    assert probes["startupProbe"]["httpGet"]["path"] == "/health"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health/live"
    # a slow first load (weights over network storage, kernel timing) is tolerated: >= 30 min
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800

    # while loading or draining /health says 503 (not ready), liveness's route still 200
    registry = ModelRegistry()
    registry.add(FakeEngine())
    loading = TestClient(create_app(registry, ServerSettings(api_keys=("secret",))))
    assert loading.get("/health").status_code == 503
    assert loading.get(probes["livenessProbe"]["httpGet"]["path"]).status_code == 200
    registry.mark_ready()
    registry.state = "draining"
    assert loading.get("/health").status_code == 503
    assert loading.get(probes["livenessProbe"]["httpGet"]["path"]).status_code == 200


def test_dashboard_reads_only_metrics_hearth_exports(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["panels"]
    exprs = dashboard_exprs()
    used = set().union(*map(metric_names, exprs))
    assert used and used <= exported, sorted(used - exported)
    # the panels the brief asks for: rates, latency quantiles, tokens, queue, KV cache, errors
    text = "\n".join(exprs)
    for needle in (
        "hearth_http_requests_total",
        "histogram_quantile(0.99, sum by (le) (rate(hearth_time_to_first_token_seconds_bucket",
        "hearth_inter_token_latency_seconds_bucket",
        "hearth_generation_tokens_total",
        "hearth_requests_running",
        "hearth_requests_waiting",
        "hearth_kv_cache_usage_ratio",
        'status!~"2.."',
    ):
        assert needle in text
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_hpa_metric_is_served_by_the_adapter_rule_from_a_real_gauge(
    objects: dict[str, dict[str, Any]], exported: set[str]
) -> None:
    [metric] = objects["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))["rules"]["custom"]
    [rule] = [r for r in rules if r["name"]["as"] == name]
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["resources"]["overrides"].keys() == {"namespace", "pod"}
    for promql in (rule["seriesQuery"], rule["metricsQuery"]):
        assert metric_names(promql) <= exported, promql
    assert name in exported  # a gauge, served under its own name
