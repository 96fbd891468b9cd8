"""The kustomize base: every manifest valid for Kubernetes, the operator locked down, RBAC least-privilege, the
kustomization complete, and the pieces that refer to each other (selectors, port names) in agreement."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_cases import BASE, K8S_VERSION, REPO

KUSTOMIZATION = BASE / "kustomization.yaml"
MONITORING = BASE / "monitoring"  # PrometheusRule and Grafana dashboard: checked by their own tests
EXAMPLES_DIR = REPO / "k8s" / "examples"

_SELECTOR = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
_NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "regex": {"type": "string"},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
    },
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABELING},
        "metricRelabelings": {"type": "array", "items": _RELABELING},
    },
}


def _monitor_schema(kind: str, endpoints: str) -> dict[str, Any]:
    """monitoring.coreos.com/v1 is the Prometheus Operator's CRD, not a core type, so kubernetes-validate has no
    schema for it: this is the subset of its fields the manifests use, with the CRD's own names and types."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"enum": ["monitoring.coreos.com/v1"]},
            "kind": {"enum": [kind]},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
            },
            "spec": {
                "type": "object",
                "required": ["selector", endpoints],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": _NAMESPACE_SELECTOR,
                    "jobLabel": {"type": "string"},
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


MONITORING_SCHEMAS = {
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints"),
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints"),
}


def manifest_files() -> list[Path]:
    """Every manifest of the base (optional/ included), but the kustomization and the monitoring folder."""
    return sorted(p for p in BASE.rglob("*.yaml") if p != KUSTOMIZATION and MONITORING not in p.parents)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for p in manifest_files()
        if p.parent == BASE
        for d in documents(p)
    }


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(obj, MONITORING_SCHEMAS[obj["kind"]])
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(BASE)))
def test_manifest_validates(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{path} holds no object"
    for obj in docs:
        validate(obj)


def test_the_monitoring_schemas_reject_typos() -> None:
    monitor = documents(BASE / "podmonitor.yaml")[0]
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_kustomization_lists_every_manifest_and_each_exists() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    listed = kustomization["resources"]
    top_level = sorted(p.name for p in BASE.glob("*.yaml") if p != KUSTOMIZATION)
    assert sorted(r for r in listed if "/" not in r) == top_level
    assert "monitoring/prometheusrule.yaml" in listed
    (dashboard,) = kustomization["configMapGenerator"]
    assert dashboard["files"] == ["monitoring/grafana-dashboard.json"]
    assert dashboard["options"]["labels"] == {"grafana_dashboard": "1"}
    referenced = [*listed, *dashboard["files"]]
    assert [r for r in referenced if not (BASE / r).is_file()] == []
    assert "optional/node-cordon.yaml" not in listed  # applied on purpose, with the cordon flag


def test_examples_kustomization_lists_every_example() -> None:
    listed = yaml.safe_load((EXAMPLES_DIR / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(
        p.name for p in EXAMPLES_DIR.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_operator_deployment_is_locked_down() -> None:
    deployment = base_objects()[("Deployment", "vlctl-operator")]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9400
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in ports
    assert (
        pod["serviceAccountName"] == base_objects()[("ServiceAccount", "vlctl-operator")]["metadata"]["name"]
    )
    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env["VLCTL_DATABASE_URL"]  # by Secret reference only
    assert env["VLCTL_OPERATOR_METRICS_PORT"]["value"] == str(ports["metrics"])
    assert env["VLCTL_OPERATOR_HEALTH_PORT"]["value"] == str(ports["health"])


def test_metrics_service_and_servicemonitor_select_the_operator() -> None:
    objects = base_objects()
    pod_labels = objects[("Deployment", "vlctl-operator")]["spec"]["template"]["metadata"]["labels"]
    service = objects[("Service", "vlctl-operator-metrics")]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = objects[("ServiceMonitor", "vlctl-operator")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}


def _rules(kind: str, name: str, path: Path = BASE / "rbac.yaml") -> list[dict[str, Any]]:
    (role,) = [d for d in documents(path) if d["kind"] == kind and d["metadata"]["name"] == name]
    return role["rules"]


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_rbac_is_least_privilege() -> None:
    grants = _grants(_rules("ClusterRole", "vlctl-operator"))
    assert not any("*" in grant for grant in grants)
    resources = {(g, r) for g, r, _ in grants}
    assert (
        "",
        "secrets",
    ) not in resources  # secrets reach the pods by reference; the operator never reads them
    # The exact verbs are checked against what the operator does in test_rbac.py; here, the shape.
    assert not any(r == "nodes" for _, r, _ in grants)  # patch (cordon) only in optional/
    assert {v for g, r, v in grants if r == "pods"} <= {"create", "delete", "get", "list", "watch"}
    assert {v for g, r, v in grants if r == "pods/log"} == {"get"}
    assert {v for g, r, v in grants if r == "events"} <= {"create", "patch"}
    for needed in ("trainingjobs", "trainingjobs/status", "trainingjobs/finalizers"):
        assert ("vlctl.dev", needed) in resources
    assert ("scheduling.volcano.sh", "podgroups") in resources
    assert not any(g == "coordination.k8s.io" for g, _ in resources)  # leases: namespaced Role only
    leases = _grants(_rules("Role", "vlctl-operator-leader-election"))
    assert {(g, r) for g, r, _ in leases} == {("coordination.k8s.io", "leases")}
    cordon = _grants(
        _rules("ClusterRole", "vlctl-operator-node-cordon", BASE / "optional" / "node-cordon.yaml")
    )
    assert cordon == {("", "nodes", "patch")}


def test_bindings_name_the_operator_service_account() -> None:
    account = base_objects()[("ServiceAccount", "vlctl-operator")]["metadata"]
    for path in (BASE / "rbac.yaml", BASE / "optional" / "node-cordon.yaml"):
        for binding in (d for d in documents(path) if d["kind"].endswith("Binding")):
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
            ]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_base_into_valid_objects() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ConfigMap", "vlctl-grafana-dashboard") in kinds
    assert ("CustomResourceDefinition", "trainingjobs.vlctl.dev") in kinds
    for obj in objects:
        if obj["kind"] != "PrometheusRule":  # monitoring/'s own tests check it against Prometheus
            validate(obj)
    dashboard = next(o for o in objects if o["metadata"]["name"] == "vlctl-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_the_optional_dashboard_is_locked_down_and_takes_its_secrets_by_reference() -> None:
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents(BASE / "optional" / "dashboard.yaml")}
    deployment, service = objects[("Deployment", "vlctl-dashboard")], objects[("Service", "vlctl-dashboard")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # it needs no Kubernetes API
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["command"] == ["vlctl", "ui"] and container["args"][:2] == ["--host", "0.0.0.0"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e for e in container["env"]}
    # Beyond loopback `vlctl ui` refuses to start without a token: both come from Secrets, never inline.
    assert env["VLCTL_UI_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "vlctl-ui-token"
    assert "value" not in env["VLCTL_DATABASE_URL"] and "value" not in env["VLCTL_UI_TOKEN"]
    assert all(
        "tcpSocket" in container[p] for p in ("readinessProbe", "livenessProbe")
    )  # HTTP needs the token
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
