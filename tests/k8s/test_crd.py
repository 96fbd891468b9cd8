"""The TrainingJob CRD: valid for Kubernetes, structural, in sync with the spec model and with k8s/base/crd.yaml,
and accepting exactly the example jobs that the spec model accepts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_cases import EXAMPLES, K8S_VERSION, REPO
from pydantic import BaseModel, Field

from controller.spec import Resources, SpecError, TrainingJobSpec, parse_spec
from k8s.crd import (
    API_VERSION,
    CONDITION_TYPES,
    CRD_NAME,
    KIND,
    PHASES,
    crd_manifest,
    crd_yaml,
    env_secrets,
    object_from_spec,
    spec_from_object,
    spec_schema,
    status_phase,
)

CRD_FILE = REPO / "k8s" / "base" / "crd.yaml"
_INSIDE_UNIONS_FORBIDDEN = ("type", "description", "default", "additionalProperties", "nullable")


def root_schema(manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    manifest = manifest or crd_manifest()
    return manifest["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 (the CRD's dialect) -> JSON Schema draft 4: `nullable` becomes a null type, and the
    x-kubernetes-* extensions, which jsonschema does not know, are dropped (int-or-string and preserve-unknown
    nodes carry no type, so they accept any value, as the API server's schema check does)."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: as_json_schema(v) for k, v in node.items() if k != "nullable" and not k.startswith("x-kubernetes-")
    }
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    # Draft 4 has OpenAPI 3.0's boolean exclusiveMinimum.
    return jsonschema.Draft4Validator(as_json_schema(schema))


def structural_problems(node: dict[str, Any], path: str = "") -> list[str]:
    """The API server's structural-schema rules that a generator can break (see the CRD docs)."""
    problems = []
    free = node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    if not node.get("type") and not free:
        problems.append(f"{path or '<root>'}: no type")
    if "$ref" in node or "$defs" in node:
        problems.append(f"{path}: $ref or $defs")
    for union in ("anyOf", "oneOf", "allOf"):
        for branch in node.get(union, []):
            problems += [f"{path}.{union}: {k} inside" for k in _INSIDE_UNIONS_FORBIDDEN if k in branch]
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if node.get("x-kubernetes-list-type") == "map":
        item = node["items"]
        for key in node["x-kubernetes-list-map-keys"]:
            if key not in item.get("required", []) and "default" not in item["properties"][key]:
                problems.append(f"{path}: list-map key {key} neither required nor defaulted")
    if "default" in node:
        errors = list(
            validator({k: v for k, v in node.items() if k != "default"}).iter_errors(node["default"])
        )
        problems += [f"{path}: default {node['default']!r} invalid: {e.message}" for e in errors]
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_problems(node[key], f"{path}[]")
    return problems


def test_there_are_three_examples() -> None:
    assert [p.stem for p in EXAMPLES] == ["qwen2-vl-2b", "qwen2-vl-72b", "qwen2-vl-7b"]


def test_crd_validates_against_the_official_schema() -> None:
    kubernetes_validate.validate(crd_manifest(), K8S_VERSION, strict=True)
    crd = crd_manifest()
    assert crd["metadata"]["name"] == CRD_NAME == "trainingjobs.vlctl.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("TrainingJob", "trainingjobs", ["tj"])
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Step", "Restarts", "Checkpoint", "ETTR", "Age"]


def test_crd_schema_is_structural() -> None:
    root = root_schema()
    assert structural_problems(root) == []
    assert root["properties"]["metadata"] == {"type": "object"}  # nothing but name may be constrained there
    assert "$ref" not in yaml.safe_dump(root)


def test_the_checker_finds_what_the_api_server_rejects() -> None:
    bad = {
        "type": "object",
        "properties": {
            "untyped": {"description": "x"},
            "union": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "bad_default": {"type": "integer", "minimum": 1, "default": 0},
        },
    }
    problems = structural_problems(bad)
    assert any(".untyped: no type" in p for p in problems)
    assert any(".union.anyOf: type inside" in p for p in problems)
    assert any(".bad_default: default 0 invalid" in p for p in problems)


def test_generated_crd_equals_the_committed_file() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "k8s/base/crd.yaml is stale: run `python -m k8s.crd > k8s/base/crd.yaml`"
    )


def test_the_cli_prints_the_crd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "k8s.crd"], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout == crd_yaml()
    assert yaml.safe_load(out.stdout)["kind"] == "CustomResourceDefinition"


def test_examples_validate_against_the_crd_and_parse_with_the_spec_model(example: dict[str, Any]) -> None:
    assert (example["apiVersion"], example["kind"]) == (API_VERSION, KIND)
    validator(root_schema()).validate(example)
    spec = parse_spec({**example["spec"], "name": example["metadata"]["name"]}, source="example")
    assert spec == spec_from_object(example)
    assert spec.backend == "kubernetes"
    assert spec.training.model.dtype == "bfloat16" and spec.training.parallel.zero_stage == 1
    assert spec.training.checkpoint.dir.startswith("s3://")
    p, r = spec.training.parallel, spec.resources
    assert r.gpus_per_node == r.procs_per_node == 8
    assert p.dp * p.tp * p.pp == r.nodes * r.procs_per_node and p.tp <= r.procs_per_node
    assert env_secrets(example) == ("s3-credentials",)


def test_example_shapes() -> None:
    shapes = {}
    for path in EXAMPLES:
        spec = spec_from_object(yaml.safe_load(path.read_text()))
        p = spec.training.parallel
        shapes[spec.training.model.name] = (spec.resources.nodes, p.dp, p.tp, p.pp)
    assert shapes == {"2b": (1, 8, 1, 1), "7b": (2, 8, 2, 1), "72b": (8, 2, 8, 4)}


@pytest.mark.parametrize(
    ("path", "value", "valid"),
    [
        ("checkpoint_policy.interval", "auto", True),
        ("checkpoint_policy.interval", 250, True),
        ("checkpoint_policy.interval", "sometimes", False),
        ("training.parallel.zero_stage", 2, False),
        ("training.training.lr", 0, False),  # exclusiveMinimum
        ("training.training.grad_clip", None, True),  # nullable
        ("training.data.tokenizer", None, True),
        ("training.model.checkpoint_text_layers", "all", True),
        ("training.model.checkpoint_text_layers", [0, 1], True),
        ("fault_tolerance.rules", [{"name": "sig", "action": "retry", "signals": [9, "SIGKILL"]}], True),
        ("fault_tolerance.rules", [{"name": "no-action"}], False),
        ("stragglers.action", "shrug", False),
        ("resources.nodes", 0, False),
    ],
)
def test_the_crd_schema_follows_the_model(path: str, value: Any, valid: bool) -> None:
    job = yaml.safe_load(EXAMPLES[0].read_text())
    node = job["spec"]
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    errors = list(validator(root_schema()).iter_errors(job))
    assert (not errors) is valid, [e.message for e in errors]
    if valid:  # and the model agrees with the schema
        spec_from_object(job)


def test_spec_name_is_metadata_name_and_objects_round_trip(example: dict[str, Any]) -> None:
    assert "name" not in spec_schema()["properties"]
    assert spec_schema()["required"] == ["training"]
    spec = spec_from_object(example)
    obj = object_from_spec(spec, namespace="ml")
    assert obj["metadata"] == {"name": example["metadata"]["name"], "namespace": "ml"}
    assert "name" not in obj["spec"]
    assert spec_from_object(obj) == spec
    validator(root_schema()).validate(obj)


def test_spec_errors_name_the_object_and_field(example: dict[str, Any]) -> None:
    broken = copy.deepcopy(example)
    broken["metadata"]["namespace"] = "ml"
    broken["spec"]["resources"]["nodes"] = 3
    with pytest.raises(SpecError, match=r"^TrainingJob ml/qwen2-vl-\w+-sft: training.parallel: dp x tp x pp"):
        spec_from_object(broken)
    with pytest.raises(SpecError, match="expected a mapping"):
        spec_from_object({"metadata": {"name": "x"}})


def test_a_field_added_to_the_model_shows_up_in_the_crd() -> None:
    class BiggerResources(Resources):
        rdma: bool = Field(False, description="request an RDMA device per node")

    class NewSpec(TrainingJobSpec):
        priority: int = Field(0, ge=0, description="higher runs first")
        resources: BiggerResources = Field(default_factory=BiggerResources)

    spec = root_schema(crd_manifest(NewSpec))["properties"]["spec"]
    assert spec["properties"]["priority"] == {
        "type": "integer",
        "description": "higher runs first",
        "minimum": 0,
        "default": 0,
    }
    rdma = spec["properties"]["resources"]["properties"]["rdma"]
    assert rdma == {"type": "boolean", "description": "request an RDMA device per node", "default": False}
    assert "priority" not in root_schema()["properties"]["spec"]["properties"]
    assert structural_problems(root_schema(crd_manifest(NewSpec))) == []


def test_a_construct_without_a_crd_mapping_fails_the_generator() -> None:
    class Odd(BaseModel):
        name: str
        step: int = Field(2, multiple_of=2)

    with pytest.raises(
        ValueError, match=r"^spec.step: JSON-schema keyword\(s\) multipleOf have no CRD mapping"
    ):
        spec_schema(Odd)


def test_status_schema_accepts_what_the_operator_writes() -> None:
    status = {
        "phase": status_phase("running"),
        "attempt": 2,
        "restarts": 1,
        "restartsCounted": 0,
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Running",
                "status": "True",
                "reason": "RanksStarted",
                "message": "attempt 2 running on 8 node(s)",
                "lastTransitionTime": "2025-01-01T00:00:00Z",
                "observedGeneration": 3,
            },
            {
                "type": "StragglerDetected",
                "status": "False",
                "reason": "NoStraggler",
                "lastTransitionTime": "x",
            },
        ],
        "lastCheckpoint": {"step": 400, "uri": "s3://b/run/step-00000400", "time": "2025-01-01T00:00:00Z"},
        "stragglers": [{"rank": 13, "node": "gpu-7", "score": 9.5, "slowdown": 1.4, "phase": "forward"}],
        "excludedNodes": ["gpu-7"],
        "ettr": 0.93,
        "progress": {"step": 412, "totalSteps": 5000, "loss": 1.25, "tokensPerSecond": 81234.5},
    }
    schema = root_schema()["properties"]["status"]
    validator(schema).validate(status)
    assert PHASES == ("Pending", "Launching", "Running", "Restarting", "Succeeded", "Failed", "Cancelled")
    conditions = schema["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["properties"]["type"]["enum"] == list(CONDITION_TYPES)
    for bad in ({"type": "Sleeping"}, {"status": "Maybe"}, {"reason": "not camel case"}):
        wrong = copy.deepcopy(status)
        wrong["conditions"][0] |= bad
        assert list(validator(schema).iter_errors(wrong))
    with pytest.raises(ValueError):
        status_phase("dozing")


def test_env_secrets_annotation() -> None:
    obj = {"metadata": {"annotations": {"vlctl.dev/env-from-secrets": " s3-credentials, hf-token ,"}}}
    assert env_secrets(obj) == ("s3-credentials", "hf-token")
    assert env_secrets({"metadata": {}}) == ()


def test_crd_file_is_the_one_in_the_kustomization() -> None:
    kustomization = yaml.safe_load((CRD_FILE.parent / "kustomization.yaml").read_text())
    assert CRD_FILE.name in kustomization["resources"]
    assert Path(CRD_FILE).read_text().startswith("# Generated by `python -m k8s.crd`")
