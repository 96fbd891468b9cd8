"""A job file read as the operator reads it, and the objects the operator would create for one of its attempts
(`vlctl render`, and `vlctl submit --backend kubernetes`, which refuses what the operator would refuse).

FILE is a TrainingJob object (as in k8s/examples, or `kubectl get tj NAME -o yaml`) or a plain job spec (as
`vlctl submit` takes); `-` reads standard input.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from controller.spec import SpecError, TrainingJobSpec, parse_spec
from k8s.crd import API_VERSION, KIND, env_secrets, object_from_spec, spec_from_object
from k8s.render import render_job

DEFAULT_NAMESPACE = "default"


def read_job(path: Path) -> tuple[TrainingJobSpec, dict[str, Any]]:
    """FILE -> (validated spec, TrainingJob object); SpecError names the file and the field."""
    source = _source(path)
    try:
        text = sys.stdin.read() if source == "<stdin>" else path.read_text()
    except OSError as err:
        raise SpecError(f"{source}: cannot read ({err.strerror})") from None
    try:
        # YAML reads JSON too; a `.json` file gets JSON's stricter parser and error messages.
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SpecError(f"{source}: not valid {kind}: {str(err).splitlines()[0]}") from None
    if isinstance(raw, Mapping) and "kind" in raw:
        if raw.get("kind") != KIND or raw.get("apiVersion") != API_VERSION:
            raise SpecError(
                f"{source}: expected a {API_VERSION} {KIND} or a job spec, got "
                f"{raw.get('apiVersion')} {raw.get('kind')}"
            )
        try:
            spec = spec_from_object(raw)
        except SpecError as err:
            raise SpecError(f"{source}: {err}") from None
        return spec, dict(raw)
    spec = parse_spec(raw, source=source)
    return spec, object_from_spec(spec)


def _source(path: Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def owner_reference(obj: Mapping[str, Any]) -> dict[str, str] | None:
    """The TrainingJob as owner of the attempt's objects, when it carries a uid (it came from the cluster)."""
    meta = obj.get("metadata") or {}
    if not meta.get("uid"):
        return None
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"]}


def render_objects(
    path: Path,
    *,
    namespace: str | None,
    attempt: int,
    image: str,
    gang: str,
    queue: str | None,
) -> list[dict[str, Any]]:
    """The TrainingJob object, then every object of the attempt in creation order."""
    spec, obj = read_job(path)
    if spec.backend != "kubernetes" and "backend" in spec.model_fields_set:
        raise SpecError(
            f"{_source(path)}: backend: the operator runs kubernetes jobs only, got {spec.backend!r}"
        )
    spec.backend = "kubernetes"
    meta = obj.get("metadata") or {}
    namespace = namespace or meta.get("namespace") or DEFAULT_NAMESPACE
    rest = {k: v for k, v in meta.items() if k not in ("name", "namespace")}
    obj["metadata"] = {"name": meta.get("name"), "namespace": namespace, **rest}
    try:
        objects = render_job(
            spec,
            namespace=namespace,
            attempt=attempt,
            resume_from=None,
            excluded_nodes=(),
            image=image,
            owner=owner_reference(obj),
            gang=gang,  # type: ignore[arg-type]  # checked by render_job
            queue=queue,
            env_secrets=env_secrets(obj),
        )
    except ValueError as err:  # the options are checked already: this is about the spec
        raise SpecError(f"{_source(path)}: {err}") from None
    return [obj, *objects]
