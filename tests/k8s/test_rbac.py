"""RBAC: the operator's roles (k8s/base/rbac.yaml, and optional/node-cordon.yaml for the cordon flag) grant
exactly what the operator and its backend use.

Two views, tied together:

- The code: every Kubernetes client method named in the k8s package (k8s/api.py and k8s/backend.py among them),
  with the HTTP method and path template each one requests (read from the generated client by calling it
  against a recorder).
- A tour: one operator (Volcano gangs, the cordon flag) meets every situation those calls serve, against the
  API stand-in: admission, a rejected spec, creates whose reply was lost (read back), a status conflict (read
  again), a failed pod (its log), a restart, an excluded node (cordoned), deletion, leader election and release.
  The stand-in records each request as the API server's authorizer sees it (API group, resource/subresource,
  verb), plus what admission checks besides (blockOwnerDeletion -> update on the owner's finalizers).

The tour must have made every call the code names (so no call escapes the recording), and the recorded
permissions must equal the roles' grants, rule for rule: no missing permission, no unused one. (The custom-object
calls share one path template for every group and plural, so for them the recording alone says which resource:
a tour that misses a new custom resource would let it through. The operator uses two: trainingjobs, podgroups.)
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from apiserver import FakeApiServer
from kubernetes import client
from test_operator import (  # noqa: F401 - api, db and start_operator are the operator tests' fixtures
    LEASE_NAMESPACE,
    NAMESPACE,
    OperatorThread,
    api,
    create_job,
    db,
    delete_job,
    pods,
    run_pods,
    start_operator,
    store_job,
    torchrun_failure,
    training_job,
    wait_for,
)

from controller.store.records import exclude_node
from controller.store.session import Store

pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]
CODE = tuple(sorted((REPO / "k8s").glob("*.py")))
BASE = REPO / "k8s" / "base"
API_CLASSES = (client.CoreV1Api, client.CustomObjectsApi, client.CoordinationV1Api)
Grant = tuple[str, str, str]  # (API group, resource, verb)


def grants(path: Path, kind: str, name: str) -> set[Grant]:
    (role,) = [
        d
        for d in yaml.safe_load_all(path.read_text())
        if d and d["kind"] == kind and d["metadata"]["name"] == name
    ]
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


class _Recorded(Exception):
    pass


class _Recorder(client.ApiClient):
    """Stops a generated method at the point it would send its request, keeping the method and path template."""

    def call_api(self, resource_path: str, method: str, *args: Any, **kwargs: Any) -> Any:
        self.seen = (method, resource_path)
        raise _Recorded


def calls_in_code() -> dict[str, tuple[str, str]]:
    """Client method name -> (HTTP method, path template), for every client method the code refers to."""
    methods = {name for cls in API_CLASSES for name in dir(cls) if not name.startswith("_")}
    named = {
        node.attr
        for path in CODE
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in methods
    }
    found = {}
    for name in sorted(named):
        recorder = _Recorder()
        cls = next(c for c in API_CLASSES if hasattr(c, name))
        method = getattr(cls(recorder), name)
        required = [
            p
            for p in inspect.signature(method).parameters.values()
            if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        with pytest.raises(_Recorded):
            method(*[{} if p.name == "body" else "x" for p in required])
        found[name] = recorder.seen
    return found


def test_the_code_calls_the_api_through_named_client_methods() -> None:
    calls = calls_in_code()
    assert "create_namespaced_pod" in calls and "replace_namespaced_lease" in calls
    assert calls["read_namespaced_pod_log"] == ("GET", "/api/v1/namespaces/{namespace}/pods/{name}/log")


def test_roles_grant_exactly_what_the_operator_uses(
    api: FakeApiServer,  # noqa: F811 - the fixture, imported above
    db: Store,  # noqa: F811
    start_operator: Callable[..., OperatorThread],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: set[tuple[str, str]] = set()
    original = client.ApiClient.call_api

    def recording(self: client.ApiClient, resource_path: str, method: str, *args: Any, **kwargs: Any) -> Any:
        made.add((method, resource_path))
        return original(self, resource_path, method, *args, **kwargs)

    monkeypatch.setattr(client.ApiClient, "call_api", recording)
    for node in ("node-a", "node-b"):
        api.put_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "spec": {}})
    # Replies lost after the server did the create (read back), and a status write that meets a conflict.
    for resource, name in (
        ("configmaps", "tour-a1-config"),
        ("services", "tour-a1"),
        ("podgroups", "tour-a1"),
        ("pods", "tour-a1-n0"),
    ):
        api.inject(504, verb="create", resource=resource, name=name, after=True)
    api.inject(409, verb="update", resource="trainingjobs/status")

    replica = start_operator(gang="volcano", queue="research", cordon_excluded_nodes=True)
    rejected = training_job("rejected")
    rejected["spec"]["training"]["checkpoint"]["dir"] = "/local/disk"
    create_job(api, rejected)
    create_job(api, training_job("tour"))
    wait_for(lambda: len(pods(api, "tour", 1)) == 2, what="attempt 1")
    run_pods(api, "tour", 1, ["node-a", "node-b"])
    with db.transaction() as session:
        job = session.merge(store_job(db, "tour"))
        exclude_node(session=session, node="node-b", reason="Straggler", message="slow", job=job)
    wait_for(lambda: api.get("nodes", None, "node-b")["spec"].get("unschedulable"), what="node-b cordoned")
    api.set_pod_log(NAMESPACE, "tour-a1-n1", torchrun_failure(rank=1, local_rank=0, code=1))
    api.set_pod_status(NAMESPACE, "tour-a1-n1", "Failed", exit_code=1)
    wait_for(lambda: len(pods(api, "tour", 2)) == 2, what="attempt 2")
    delete_job(api, "tour")
    wait_for(lambda: api.get("trainingjobs", NAMESPACE, "tour") is None, what="the deletion")
    replica.stop()  # releases the Lease

    missed = {name: call for name, call in calls_in_code().items() if call not in made}
    assert not missed, f"the tour never made these calls of the code: {missed}"

    requests = [r for r in api.requests() if r.user_agent == replica.agent]
    used = {(r.group, r.resource, r.verb) for r in requests} | api.implied_permissions()
    leases = {g for g in used if g[1] == "leases"}
    nodes = {g for g in used if g[1] == "nodes"}
    assert used - leases - nodes == grants(BASE / "rbac.yaml", "ClusterRole", "vlctl-operator")
    assert leases == grants(BASE / "rbac.yaml", "Role", "vlctl-operator-leader-election")
    assert {r.namespace for r in requests if r.resource == "leases"} == {LEASE_NAMESPACE}  # the Role's
    assert nodes == grants(
        BASE / "optional" / "node-cordon.yaml", "ClusterRole", "vlctl-operator-node-cordon"
    )
