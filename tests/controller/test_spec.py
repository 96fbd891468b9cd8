"""The TrainingJob spec: valid files parse; invalid ones fail with one line naming the field path."""

from __future__ import annotations

import json

import pytest
import yaml

from controller.failures import FailureAction
from controller.spec import SpecError, load_spec, parse_spec

VALID = {
    "name": "grounding-2x2",
    "training": {
        "model": {"name": "mini"},
        "data": {"paths": ["data/train.jsonl"], "rows_per_step": 8},
        "parallel": {"dp": 2, "tp": 1, "pp": 2},
        "training": {"steps": 100, "stage": 3},
    },
    "resources": {"nodes": 2, "procs_per_node": 2},
    "checkpoint_policy": {"interval": "auto"},
    "fault_tolerance": {
        "max_restarts": 5,
        "hang_timeout_seconds": 120,
        "rules": [
            {"name": "nccl-timeouts", "action": "ignore-for-limit", "message_pattern": "NCCL.*timeout"}
        ],
    },
    "stragglers": {"action": "exclude-node", "window": 10},
}


def with_(**changes):
    spec = json.loads(json.dumps(VALID))
    for path, value in changes.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return spec


def test_valid_spec_builds_the_decision_settings(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(VALID))
    spec = load_spec(path)
    assert spec.resources.world_size == spec.training.parallel.world_size == 4
    assert spec.restart_policy().max_restarts == 5
    assert spec.hang_config().hang_timeout_seconds == 120
    assert spec.straggler_config().window == 10
    rules = spec.failure_rules()
    assert rules[0].action is FailureAction.IGNORE_FOR_LIMIT
    assert spec.checkpoint_interval_policy().min_interval_steps == 10
    assert spec.checkpoint_interval_policy().prior_mtbf_seconds == 86_400  # unset: one failure a day
    sized = parse_spec(
        {
            **VALID,
            "checkpoint_policy": {**VALID.get("checkpoint_policy", {}), "expected_failures_per_day": 48},
        }
    )
    assert sized.checkpoint_interval_policy().prior_mtbf_seconds == 1800  # a job expecting 48 a day


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Grounding_Run"}, "name: 'Grounding_Run' is not a DNS-1123 label"),
        ({"name": "a" * 64}, "is not a DNS-1123 label"),
        (
            {"resources__nodes": 3},
            "dp x tp x pp = 2 x 1 x 2 = 4 must equal resources.nodes x resources.procs_per_node",
        ),
        ({"training__model__name": "13b"}, "training.model.name: unknown preset '13b'"),
        ({"training__training__lr": "fast"}, "training.training.lr: Input should be a valid number"),
        ({"resources__procs_per_node": "two"}, "resources.procs_per_node: Input should be a valid integer"),
        ({"stragglers__action": "evict"}, "stragglers.action: Input should be 'report' or 'exclude-node'"),
        ({"checkpoint_policy__interval": "often"}, "checkpoint_policy.interval"),
        (
            {"fault_tolerance__rules": [{"name": "x", "action": "retry", "message_pattern": "("}]},
            "fault_tolerance.rules.0.message_pattern: not a regular expression",
        ),
        ({"backend": "slurm"}, "backend: Input should be 'local' or 'kubernetes'"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_name_the_field(changes, message):
    with pytest.raises(SpecError) as err:
        parse_spec(with_(**changes), source="job.yaml")
    text = str(err.value)
    assert text.startswith("job.yaml: ") and message in text and "\n" not in text


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml: cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(SpecError, match="bad.json: not valid JSON"):
        load_spec(bad)


def test_example_jobs_are_valid():
    from pathlib import Path

    for example in sorted(Path(__file__).resolve().parents[2].glob("examples/jobs/*.yaml")):
        load_spec(example)


def test_the_spec_holds_no_secret_values_only_references() -> None:
    """No field of the job spec (nor of the trainer config inside it) can carry a credential: secrets reach the
    pods by reference (a Secret's name on the TrainingJob, see k8s/crd.py), never in the spec."""
    import re

    from controller.spec import TrainingJobSpec

    # A credential's field name (`max_video_tokens` counts tokens of text, not of authentication).
    secretish = re.compile(
        r"(^|_)(password|passwd|secret|credentials?|api_?key|access_key|secret_key|private_key|token)$", re.I
    )

    def fields(schema: dict, defs: dict, path: str = "") -> list[str]:
        if "$ref" in schema:
            schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
        found = []
        for name, sub in schema.get("properties", {}).items():
            found.append(f"{path}{name}")
            found += fields(sub, defs, f"{path}{name}.")
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in schema.get(key, []):
                found += fields(sub, defs, path)
        if isinstance(schema.get("items"), dict):
            found += fields(schema["items"], defs, path)
        return found

    schema = TrainingJobSpec.model_json_schema()
    names = fields(schema, schema.get("$defs", {}))
    assert len(names) > 50  # the walk reached the nested sections
    assert [n for n in names if secretish.search(n.rsplit(".", 1)[-1])] == []


def test_recovery_defaults_to_in_place_where_it_applies():
    """Left unset, `recovery` is in-place with one hot spare locally and none on Kubernetes (a spare pod would
    hold a node's GPUs idle); a one-rank job takes restart (no peer keeps a replica), and asking for in-place
    there is the one-line error. What the defaults resolved to is what the stored spec says; the CRD carries
    neither default, so the API server never writes one in that the operator would take for the user's."""
    from k8s.crd import crd_manifest

    spec = parse_spec(VALID)
    f = spec.fault_tolerance
    assert (f.recovery, f.hot_spares, f.recovery_chosen()) == ("in-place", 1, False)
    on_k8s = parse_spec(with_(backend="kubernetes"))
    assert (on_k8s.fault_tolerance.recovery, on_k8s.fault_tolerance.hot_spares) == ("in-place", 0)
    chosen = parse_spec(with_(backend="kubernetes", fault_tolerance__hot_spares=2))
    assert chosen.fault_tolerance.hot_spares == 2
    single = with_(resources__nodes=1, resources__procs_per_node=1, training__parallel={"dp": 1})
    alone = parse_spec(single)
    assert alone.fault_tolerance.recovery == "restart"
    assert parse_spec(alone.model_dump(mode="json")).fault_tolerance.recovery == "restart"
    single["fault_tolerance"]["recovery"] = "in-place"
    with pytest.raises(
        SpecError, match=r"^job\.yaml: fault_tolerance\.recovery: in-place needs at least 2 ranks"
    ):
        parse_spec(single, source="job.yaml")
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    fields = schema["fault_tolerance"]["properties"]
    assert "default" not in fields["recovery"] and "default" not in fields["hot_spares"]
    assert fields["max_restarts"]["default"] == 3  # the others keep theirs
