"""The TrainingJob CustomResourceDefinition, generated from the job-spec model so the two never disagree.

`python -m k8s.crd > k8s/base/crd.yaml` writes it; a test fails when the file drifts from the generator.

Decisions:

- The `spec` schema is `controller.spec.TrainingJobSpec.model_json_schema()` made *structural* (what the API
  server requires of a CRD schema: every node typed, no `$ref`, no types inside `anyOf`). `name` leaves the spec:
  a TrainingJob's name is its `metadata.name`, injected back by `spec_from_object`.
- Mapping of pydantic constructs: `$ref` is inlined; `X | None` becomes `X` with `nullable: true` (a None
  default is left out: absent and None mean the same to the model); a `Literal` becomes `enum`; `int | "auto"`
  becomes `x-kubernetes-int-or-string` with a `pattern` (JSON Schema applies `pattern` to strings only, so
  integers still pass); any other union, and free-form dicts, become `x-kubernetes-preserve-unknown-fields`
  (the operator validates the whole spec with the pydantic model anyway); `exclusiveMinimum: N` becomes OpenAPI
  3.0's `minimum: N, exclusiveMinimum: true`; `additionalProperties: false` is dropped, because structural
  schemas prune unknown fields by themselves (and `kubectl apply` with server-side field validation rejects
  them); titles are dropped as noise; descriptions and non-None defaults are kept.
- A JSON-schema keyword the mapping does not know raises ValueError, so a new pydantic construct in the spec
  fails the generator and its test instead of producing a CRD the API server rejects.
- `status` is written by hand: it is the operator's, not the user's. Conditions are a map list keyed by type,
  Kubernetes style; phases are the controller's `Phase` values in CamelCase (`status_phase`).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel

from controller.domain.phases import Phase
from controller.spec import TrainingJobSpec, parse_spec

GROUP = "vlctl.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
LIST_KIND = "TrainingJobList"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ("tj",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# Condition types, each with status True/False/Unknown and a CamelCase reason.
CONDITION_CREATED = "Created"
CONDITION_RUNNING = "Running"
CONDITION_RESTARTING = "Restarting"
CONDITION_STRAGGLER_DETECTED = "StragglerDetected"
CONDITION_SUCCEEDED = "Succeeded"
CONDITION_FAILED = "Failed"
CONDITION_TYPES = (
    CONDITION_CREATED,
    CONDITION_RUNNING,
    CONDITION_RESTARTING,
    CONDITION_STRAGGLER_DETECTED,
    CONDITION_SUCCEEDED,
    CONDITION_FAILED,
)
PHASES = tuple(p.value.capitalize() for p in Phase)  # Pending, Launching, Running, ...

# Secrets whose keys become environment variables of every trainer pod (object-storage credentials), by name
# only: comma-separated Secret names in this annotation of the TrainingJob. The spec has no field for it yet.
ANNOTATION_ENV_SECRETS = f"{GROUP}/env-from-secrets"

# Kubernetes' own limit on top of the spec's DNS-1123 label: the job name also names the attempt's Service (a
# DNS-1035 label, so a letter first) and prefixes pod names `<job>-a<attempt>-n<index>` (63 at most).
MAX_JOB_NAME = 50
_NAME_RULE = {
    "rule": f"self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && self.metadata.name.size() <= {MAX_JOB_NAME}",
    "message": f"metadata.name must start with a letter, hold only lowercase letters, digits and '-', and be at "
    f"most {MAX_JOB_NAME} characters (it prefixes the names of the job's pods and Service)",
}


def status_phase(phase: str) -> str:
    """A controller phase (`running`) as written to `status.phase` (`Running`)."""
    value = Phase(phase).value
    return value.capitalize()


# ------------------------------------------------------------------------------------------------ spec schema

_KEPT = (
    "type", "description", "enum", "format", "pattern", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "uniqueItems", "required",
)  # fmt: skip
_HANDLED = (
    *_KEPT, "title", "default", "$ref", "anyOf", "const", "properties", "additionalProperties", "items",
    "prefixItems", "exclusiveMinimum", "exclusiveMaximum",
)  # fmt: skip


def spec_schema(model: type[BaseModel] = TrainingJobSpec) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a TrainingJob's `spec`: the model's JSON schema without `name`."""
    raw = model.model_json_schema()
    defs = raw.get("$defs", {})
    schema = _structural(raw, defs, path="spec")
    schema["properties"].pop("name", None)
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    if not schema["required"]:
        del schema["required"]
    schema["description"] = (
        "What to train and how to keep it alive: the trainer's configuration, resources, checkpoint, "
        "fault-tolerance and straggler policies. Validated in full by the operator (controller.spec)."
    )
    return schema


def _structural(node: Mapping[str, Any], defs: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    unknown = sorted(set(node) - set(_HANDLED) - {"$defs"})
    if unknown:
        raise ValueError(f"{path}: JSON-schema keyword(s) {', '.join(unknown)} have no CRD mapping")
    if "$ref" in node:
        target = _resolve(node["$ref"], defs, path=path)
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, path=path)
    if "anyOf" in node:
        return _union(node, defs, path=path)
    out: dict[str, Any] = {k: node[k] for k in _KEPT if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node:  # JSON Schema's number form -> OpenAPI 3.0's boolean form
            out["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            out[bound] = True
    if "properties" in node:
        out["properties"] = {
            name: _structural(sub, defs, path=f"{path}.{name}") for name, sub in node["properties"].items()
        }
    elif isinstance(node.get("additionalProperties"), Mapping):
        out["additionalProperties"] = _free_form(node["additionalProperties"], defs, path=f"{path}.*")
    elif node.get("additionalProperties") is True or node.get("type") == "object":
        out["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        out["items"] = _structural(node["items"], defs, path=f"{path}[]")
    elif "prefixItems" in node:
        out["items"] = _tuple_items(node["prefixItems"], defs, path=path)
    if node.get("default") is not None:
        out["default"] = node["default"]
    return out


def _resolve(ref: str, defs: Mapping[str, Any], *, path: str) -> Mapping[str, Any]:
    name = ref.removeprefix("#/$defs/")
    if name not in defs:
        raise ValueError(f"{path}: cannot resolve {ref}")
    return defs[name]


def _free_form(node: Mapping[str, Any], defs: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    """The value schema of a dict field; an object of anything keeps its unknown fields."""
    if node.get("type") == "object" and "properties" not in node:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return _structural(node, defs, path=path)


def _tuple_items(items: list[Mapping[str, Any]], defs: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    converted = [_structural(item, defs, path=f"{path}[{i}]") for i, item in enumerate(items)]
    if all(c == converted[0] for c in converted):
        return converted[0]
    return {"x-kubernetes-preserve-unknown-fields": True}


def _union(node: Mapping[str, Any], defs: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    branches = [_resolve(b["$ref"], defs, path=path) if "$ref" in b else b for b in node["anyOf"]]
    present = [b for b in branches if b.get("type") != "null"]
    outer = {k: v for k, v in node.items() if k not in ("anyOf", "title")}
    if len(present) == 1:
        out = _structural({**present[0], **outer}, defs, path=path)
        if len(present) < len(branches):
            out["nullable"] = True
        return out
    out = {k: v for k, v in (("description", node.get("description")),) if v}
    if {b.get("type") for b in present} == {"integer", "string"}:
        out["x-kubernetes-int-or-string"] = True
        for branch in present:
            if branch["type"] == "integer":
                out.update({k: branch[k] for k in ("minimum", "maximum") if k in branch})
            elif "const" in branch or "enum" in branch:
                words = [branch["const"]] if "const" in branch else branch["enum"]
                out["pattern"] = "^(" + "|".join(re.escape(w) for w in words) + ")$"
    else:
        out["x-kubernetes-preserve-unknown-fields"] = True
        kinds = " or ".join(b.get("type", "object") for b in present)
        out["description"] = f"{out.get('description', '')} ({kinds})".strip()
    if node.get("default") is not None:
        out["default"] = node["default"]
    return out


# ---------------------------------------------------------------------------------------------- status schema


def _obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, **extra}


_INT = {"type": "integer", "format": "int64", "minimum": 0}
_TIME = {"type": "string", "format": "date-time"}


def status_schema() -> dict[str, Any]:
    condition = _obj(
        {
            "type": {"type": "string", "enum": list(CONDITION_TYPES)},
            "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
            "reason": {
                "type": "string",
                "maxLength": 1024,
                "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                "description": "CamelCase reason constant",
            },
            "message": {"type": "string", "maxLength": 32768},
            "lastTransitionTime": _TIME,
            "observedGeneration": _INT,
        },
        required=["type", "status", "reason", "lastTransitionTime"],
    )
    straggler = _obj(
        {
            "rank": {"type": "integer", "minimum": 0},
            "node": {"type": "string"},
            "score": {"type": "number", "description": "robust score against the job median"},
            "slowdown": {"type": "number", "description": "own work time over the rank's baseline"},
            "phase": {"type": "string", "description": "the step phase that grew most"},
        },
        required=["rank"],
    )
    return _obj(
        {
            "phase": {"type": "string", "enum": list(PHASES)},
            "conditions": {
                "type": "array",
                "items": condition,
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
            "attempt": {**_INT, "description": "the current (or last) attempt, from 1"},
            "restarts": {**_INT, "description": "all restarts"},
            "restartsCounted": {**_INT, "description": "restarts that count toward max_restarts"},
            "lastCheckpoint": _obj({"step": _INT, "uri": {"type": "string"}, "time": _TIME}),
            "stragglers": {"type": "array", "items": straggler},
            "excludedNodes": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "ettr": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "effective training time ratio: productive time over wall time",
            },
            "progress": _obj(
                {
                    "step": _INT,
                    "totalSteps": _INT,
                    "loss": {"type": "number", "nullable": True},
                    "tokensPerSecond": {"type": "number", "minimum": 0},
                }
            ),
            "observedGeneration": _INT,
        },
        description="Written by the operator.",
    )


# ------------------------------------------------------------------------------------------------ the CRD

PRINTER_COLUMNS = (
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step"},
    {"name": "ETTR", "type": "number", "jsonPath": ".status.ettr"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
)


def crd_manifest(model: type[BaseModel] = TrainingJobSpec) -> dict[str, Any]:
    root = _obj(
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(model),
            "status": status_schema(),
        },
        required=["spec"],
        description="A Qwen2-VL training run that vlctl launches, supervises and resumes.",
    )
    root["x-kubernetes-validations"] = [_NAME_RULE]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "vlctl"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": LIST_KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["vlctl"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in PRINTER_COLUMNS],
                }
            ],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors for the shared sub-schemas: the file is read by people and diffed in reviews."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    header = "# Generated by `python -m k8s.crd` from controller.spec.TrainingJobSpec: do not edit by hand.\n"
    return header + yaml.dump(crd_manifest(), Dumper=_PlainDumper, sort_keys=False, width=110)


# ------------------------------------------------------------------------------------ objects <-> the model


def spec_from_object(obj: Mapping[str, Any]) -> TrainingJobSpec:
    """A TrainingJob object (as the API returns it) -> the validated spec; `SpecError` names the object."""
    meta = obj.get("metadata") or {}
    where = "/".join(str(part) for part in (meta.get("namespace"), meta.get("name", "?")) if part)
    source = f"TrainingJob {where}"
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return parse_spec(spec, source=source)  # raises the one-line "expected a mapping" error
    return parse_spec({**spec, "name": meta.get("name")}, source=source)


def object_from_spec(spec: TrainingJobSpec, *, namespace: str | None = None) -> dict[str, Any]:
    """A TrainingJobSpec -> the TrainingJob object to create (unset fields left out: the CRD's defaults apply)."""
    body = spec.model_dump(mode="json", exclude_unset=True)
    metadata: dict[str, Any] = {"name": body.pop("name")}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": body}


def env_secrets(obj: Mapping[str, Any]) -> tuple[str, ...]:
    """The Secret names of ANNOTATION_ENV_SECRETS on a TrainingJob object, in order."""
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_ENV_SECRETS, "")
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def owner_of(obj: Mapping[str, Any]) -> dict[str, str]:
    """The owner reference to a TrainingJob that every object of its attempts carries."""
    meta = obj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"]}


if __name__ == "__main__":
    sys.stdout.write(crd_yaml())
