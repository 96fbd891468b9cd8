"""`vlctl render FILE`: the objects the operator would create, as a YAML stream or a JSON list, each valid for
Kubernetes (the TrainingJob against the CRD's own schema), and one-line errors with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from cli import render as render_cli
from cli.main import app
from k8s.crd import ANNOTATION_ENV_SECRETS, crd_manifest, spec_from_object

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "k8s" / "examples").glob("qwen2-vl-*.yaml"))
LOCAL_EXAMPLE = REPO / "examples" / "jobs" / "local-demo.yaml"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are checked against, as in tests/k8s
IMAGE = "registry.example.com/vlctl/trainer:0.1.0"

# Until cli/main.py registers the command itself (`render.register(app)`), the test adds it to the same app.
if not any((c.name or c.callback.__name__) == "render" for c in app.registered_commands):
    render_cli.register(app)

runner = CliRunner()
TRAININGJOB_SCHEMA = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def run(*args: str, input: str | None = None):
    return runner.invoke(app, ["render", *args], input=input)


def load_stream(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def validate(obj: dict[str, Any]) -> None:
    if obj["kind"] == "TrainingJob":
        # OpenAPI 3.0 schemas use draft 4's boolean exclusiveMinimum; the x-kubernetes-* keys are ignored.
        jsonschema.Draft4Validator(TRAININGJOB_SCHEMA).validate(obj)
    elif obj["kind"] == "PodGroup":  # Volcano's type: no schema in kubernetes-validate (tests/k8s check it)
        assert obj["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


GANGS = [("none", ()), ("volcano", ("--queue", "research")), ("kueue", ("--queue", "team-a"))]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
@pytest.mark.parametrize(("gang", "queue"), GANGS, ids=[g for g, _ in GANGS])
def test_every_example_renders_valid_objects_in_creation_order(path: Path, gang: str, queue: tuple) -> None:
    result = run(str(path), "--gang", gang, *queue, "--image", IMAGE, "-n", "ml-research")
    assert result.exit_code == 0, result.output
    objects = load_stream(result.stdout)
    nodes = spec_from_object(yaml.safe_load(path.read_text())).resources.nodes
    head = ["TrainingJob", "ConfigMap", "Service", *(["PodGroup"] if gang == "volcano" else [])]
    assert [o["kind"] for o in objects] == head + ["Pod"] * nodes
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "ml-research"
    pods = [o for o in objects if o["kind"] == "Pod"]
    assert {c["image"] for p in pods for c in p["spec"]["containers"]} == {IMAGE}
    # Secrets named on the TrainingJob become the pods' environment, as the operator does.
    secret = yaml.safe_load(path.read_text())["metadata"]["annotations"][ANNOTATION_ENV_SECRETS]
    assert all(p["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": secret}}] for p in pods)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_json_output_is_the_same_objects_as_one_list(path: Path) -> None:
    as_yaml = load_stream(run(str(path), "--attempt", "3").stdout)
    result = run(str(path), "--attempt", "3", "--output", "json")
    assert result.exit_code == 0, result.output
    as_json = json.loads(result.stdout)
    assert as_json == as_yaml
    name = as_json[0]["metadata"]["name"]
    assert [o["metadata"]["name"] for o in as_json if o["kind"] == "Pod"][0] == f"{name}-a3-n0"
    assert all(o["metadata"]["labels"]["vlctl.dev/attempt"] == "3" for o in as_json[1:])


def test_a_plain_spec_renders_like_its_trainingjob(tmp_path: Path) -> None:
    obj = yaml.safe_load(EXAMPLES[0].read_text())
    plain = {"name": obj["metadata"]["name"], **obj["spec"]}
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(plain))
    from_spec = json.loads(run(str(spec_file), "-o", "json").stdout)
    from_object = json.loads(run(str(EXAMPLES[0]), "-o", "json").stdout)
    # The TrainingJob to apply for the spec: the same spec, without the annotations the file never had.
    assert from_spec[0] == {
        "apiVersion": "vlctl.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": plain["name"], "namespace": "default"},
        "spec": obj["spec"],
    }
    for a, b in zip(from_spec[1:], from_object[1:], strict=True):
        if a["kind"] == "Pod":
            assert "envFrom" not in a["spec"]["containers"][0]
            b["spec"]["containers"][0].pop("envFrom")
        assert a == b


def test_an_object_from_the_cluster_owns_the_attempt_and_keeps_its_namespace() -> None:
    obj = yaml.safe_load(EXAMPLES[0].read_text())
    obj["metadata"] |= {"namespace": "team-b", "uid": "0b4a7c6e-8f51-4f7e-9a43-2c5d6f1e3a90"}
    result = run("-", "-o", "json", input=yaml.safe_dump(obj))
    assert result.exit_code == 0, result.output
    objects = json.loads(result.stdout)
    owner = {
        "apiVersion": "vlctl.dev/v1alpha1",
        "kind": "TrainingJob",
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert all(o["metadata"]["namespace"] == "team-b" for o in objects)
    assert all(o["metadata"]["ownerReferences"] == [owner] for o in objects[1:])
    pod = objects[-1]
    assert ".team-b.svc" in " ".join(pod["spec"]["containers"][0]["command"])
    # Without a uid (a file not yet applied) there is no owner to reference.
    plain = json.loads(run(str(EXAMPLES[0]), "-o", "json").stdout)
    assert all("ownerReferences" not in o["metadata"] for o in plain)


def test_the_gang_defaults_follow_the_operator_environment(monkeypatch) -> None:
    monkeypatch.setenv("VLCTL_GANG_SCHEDULER", "volcano")
    monkeypatch.setenv("VLCTL_GANG_QUEUE", "research")
    monkeypatch.setenv("VLCTL_TRAINER_IMAGE", IMAGE)
    objects = json.loads(run(str(EXAMPLES[0]), "-o", "json").stdout)
    group = next(o for o in objects if o["kind"] == "PodGroup")
    assert group["spec"] == {"minMember": 1, "queue": "research"}
    pod = objects[-1]
    assert pod["spec"]["schedulerName"] == "volcano" and pod["spec"]["containers"][0]["image"] == IMAGE


def _edited(tmp_path: Path, edit) -> str:
    obj = yaml.safe_load(EXAMPLES[0].read_text())
    edit(obj)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(obj))
    return str(path)


@pytest.mark.parametrize(
    ("make", "args", "pattern"),
    [
        (
            lambda p: _edited(p, lambda o: o["spec"]["resources"].update(nodes=3)),
            (),
            r"job\.yaml: TrainingJob qwen2-vl-2b-sft: training\.parallel: dp x tp x pp",
        ),
        (
            lambda p: _edited(p, lambda o: o["spec"]["training"]["checkpoint"].update(dir="ckpt")),
            (),
            r"job\.yaml: training\.checkpoint\.dir: 'ckpt' is on the pod's own disk",
        ),
        (
            lambda p: str(LOCAL_EXAMPLE),
            (),
            r"local-demo\.yaml: backend: the operator runs kubernetes jobs only",
        ),
        (
            lambda p: _edited(p, lambda o: o.update(kind="Pod")),
            (),
            r"expected a vlctl\.dev/v1alpha1 TrainingJob",
        ),
        (lambda p: str(p / "missing.yaml"), (), r"missing\.yaml: cannot read"),
        (lambda p: str(EXAMPLES[0]), ("--gang", "kueue"), r"--queue: gang kueue needs"),
        (lambda p: str(EXAMPLES[0]), ("--queue", "q"), r"--queue: 'q' is only used with"),
        (lambda p: str(EXAMPLES[0]), ("--attempt", "0"), r"--attempt: must be >= 1"),
        (lambda p: str(EXAMPLES[0]), ("-n", "Team_B"), r"--namespace: 'Team_B' is not a valid"),
    ],
    ids=[
        "gang-size",
        "local-checkpoints",
        "local-backend",
        "not-a-trainingjob",
        "missing-file",
        "kueue-without-queue",
        "queue-without-gang",
        "attempt-0",
        "bad-namespace",
    ],
)
def test_invalid_input_is_one_line_and_exit_2(tmp_path: Path, make, args, pattern) -> None:
    line = one_line_error(run(make(tmp_path), *args))
    assert re.search(pattern, line), line


def test_unparsable_input_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.json"
    bad.write_text("{not json")
    assert "job.json: not valid JSON" in one_line_error(run(str(bad)))
    assert "<stdin>: not valid YAML" in one_line_error(run("-", input="a: [1\n"))
