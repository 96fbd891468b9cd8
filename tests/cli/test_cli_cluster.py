"""`vlctl submit | list | status | events | logs | cancel` against a cluster: the HTTP stand-in for the API server
(tests/k8s/apiserver.py) behind a kubeconfig file, reached through the official client as a user's would be.

The operator does not run: the tests write what it would (status, Events, pods and their logs) into the
stand-in. Every command must leave the store alone: VLCTL_DATABASE_URL points at a file that must never appear.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "k8s"))

from apiserver import FakeApiServer  # noqa: E402

from cli.main import app  # noqa: E402
from controller.spec import load_spec, parse_spec  # noqa: E402
from k8s import render  # noqa: E402
from k8s.crd import crd_manifest, spec_from_object  # noqa: E402

# The official client still calls urllib3's deprecated getheaders().
pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning")

runner = CliRunner()
NAMESPACE = "ml"
JOB = "vl-sft"
SCHEMA = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
SPEC = {
    "name": JOB,
    "resources": {"nodes": 2, "procs_per_node": 2},
    "training": {
        "data": {"paths": ["s3://datasets/grounding.jsonl"], "rows_per_step": 16},
        "parallel": {"dp": 4},
        "training": {"steps": 100},
        "checkpoint": {"dir": "s3://checkpoints/vl-sft"},
    },
    "fault_tolerance": {"max_restarts": 5},
}
# What the operator writes once the job runs its second attempt (k8s/status.py), valid for the CRD's schema.
STATUS = {
    "phase": "Running",
    "conditions": [
        {
            "type": "Created",
            "status": "True",
            "reason": "Admitted",
            "message": "admitted as job vl-sft",
            "lastTransitionTime": "2025-01-01T10:00:00Z",
        },
        {
            "type": "Running",
            "status": "True",
            "reason": "RanksStarted",
            "message": "4 ranks on 2 nodes",
            "lastTransitionTime": "2025-01-01T10:05:00Z",
        },
        {
            "type": "StragglerDetected",
            "status": "True",
            "reason": "StragglerFlagged",
            "message": "stragglers: rank 3 on node-b",
            "lastTransitionTime": "2025-01-01T10:06:00Z",
        },
    ],
    "attempt": 2,
    "restarts": 1,
    "restartsCounted": 1,
    "lastCheckpoint": {"step": 40, "uri": "s3://checkpoints/vl-sft/step-40", "time": "2025-01-01T10:04:00Z"},
    "stragglers": [{"rank": 3, "node": "node-b", "score": 7.5}],
    "excludedNodes": ["node-c"],
    "ettr": 0.93,
    "progress": {"step": 57, "totalSteps": 100, "loss": 1.25, "tokensPerSecond": 1234.0},
    "observedGeneration": 1,
}


# ------------------------------------------------------------------------------------------------ harness


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def kubeconfig(api: FakeApiServer, tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """Contexts: `test` (current, namespace ml), `other` (no namespace), `down` (nothing listens there)."""
    path = tmp_path / "kubeconfig"
    user = {"name": "tester", "user": {"token": "not-checked"}}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "fake", "cluster": {"server": api.url}},
                    {"name": "gone", "cluster": {"server": f"http://127.0.0.1:{closed_port()}"}},
                ],
                "users": [user],
                "contexts": [
                    {
                        "name": "test",
                        "context": {"cluster": "fake", "user": "tester", "namespace": NAMESPACE},
                    },
                    {"name": "other", "context": {"cluster": "fake", "user": "tester"}},
                    {
                        "name": "down",
                        "context": {"cluster": "gone", "user": "tester", "namespace": NAMESPACE},
                    },
                ],
                "current-context": "test",
            }
        )
    )
    store = tmp_path / "store.db"
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setenv("VLCTL_DATABASE_URL", f"sqlite:///{store}")
    for name in ("KUBERNETES_SERVICE_HOST", "VLCTL_BACKEND", "VLCTL_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    yield path
    assert not store.exists(), "a cluster command opened the store"


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def k8s(*args: str):
    """A command for the cluster: selected with VLCTL_BACKEND would do too; the flag is explicit."""
    return run(*args, "--backend", "kubernetes")


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def submitted(api: FakeApiServer, spec_file: Path) -> dict[str, Any]:
    result = k8s("submit", str(spec_file))
    assert result.exit_code == 0, result.output
    obj = api.get("trainingjobs", NAMESPACE, JOB)
    assert obj is not None
    return obj


def set_status(api: FakeApiServer, status: dict[str, Any], name: str = JOB) -> None:
    jsonschema.Draft4Validator(SCHEMA["properties"]["status"]).validate(status)
    api.modify("trainingjobs", NAMESPACE, name, lambda obj: obj.__setitem__("status", status))


# ------------------------------------------------------------------------------------------------ submit


def test_submit_creates_the_trainingjob_in_the_contexts_namespace(api: FakeApiServer, spec_file: Path):
    result = k8s("submit", str(spec_file), "-o", "json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    obj = api.get("trainingjobs", NAMESPACE, JOB)
    assert obj is not None
    assert (shown["name"], shown["namespace"], shown["uid"]) == (JOB, NAMESPACE, obj["metadata"]["uid"])
    assert (shown["phase"], shown["attempt"], shown["backend"]) == (None, 0, "kubernetes")  # not admitted yet

    jsonschema.Draft4Validator(SCHEMA).validate(obj)
    assert obj["spec"]["backend"] == "kubernetes"  # unset in the file: the cluster's backend
    expected = load_spec(spec_file)
    expected.backend = "kubernetes"
    assert spec_from_object(obj) == expected
    creates = [r for r in api.requests() if r.verb == "create"]
    assert [(r.resource, r.namespace, r.name, r.user_agent) for r in creates] == [
        ("trainingjobs", NAMESPACE, JOB, "vlctl")
    ]

    again = k8s("submit", str(spec_file))
    assert "already exists in namespace ml" in one_line_error(again, 2)


def test_submit_a_trainingjob_object_keeps_its_annotations(api: FakeApiServer):
    example = REPO / "k8s" / "examples" / "qwen2-vl-7b.yaml"
    given = yaml.safe_load(example.read_text())
    result = run("submit", str(example), "--context", "other", "-o", "json")
    assert result.exit_code == 0, result.output
    obj = api.get("trainingjobs", "default", given["metadata"]["name"])  # `other` names no namespace
    assert obj is not None and json.loads(result.stdout)["namespace"] == "default"
    assert obj["metadata"]["annotations"] == given["metadata"]["annotations"]
    assert spec_from_object(obj) == spec_from_object(given)
    jsonschema.Draft4Validator(SCHEMA).validate(obj)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["resources"].update(nodes=0), r"job\.yaml: resources\.nodes: "),
        (lambda s: s.update(backend="local"), r"backend: a TrainingJob runs on the kubernetes backend"),
        (lambda s: s["training"]["checkpoint"].update(dir="/tmp/ckpt"), r"job\.yaml: .*checkpoint"),
        (lambda s: s.update(name="9" + "a" * 20), r"name: '9a+' must start with a letter"),
    ],
    ids=["spec", "backend", "operator-rule", "crd-name-rule"],
)
def test_submit_refuses_an_invalid_spec_before_writing(api: FakeApiServer, tmp_path: Path, change, message):
    spec = json.loads(json.dumps(SPEC))
    change(spec)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert re.search(message, one_line_error(k8s("submit", str(path)), 2))
    assert [r for r in api.requests() if r.verb != "get"] == []
    assert api.objects("trainingjobs") == []


# ------------------------------------------------------------------------------------------------ selection


def test_which_backend_a_command_uses(api: FakeApiServer, spec_file: Path, monkeypatch, tmp_path: Path):
    submitted(api, spec_file)
    monkeypatch.setenv("VLCTL_BACKEND", "kubernetes")
    listed = run("list", "-o", "json")
    assert [r["name"] for r in json.loads(listed.stdout)] == [JOB]
    other = run("list", "--context", "other", "-o", "json")  # namespace default: empty
    assert json.loads(other.stdout) == []
    assert "--context: no context named 'nope'" in one_line_error(run("list", "--context", "nope"), 2)
    assert "--context" in one_line_error(run("list", "--backend", "local", "--context", "test"), 2)
    monkeypatch.setenv("VLCTL_BACKEND", "cloud")
    assert "VLCTL_BACKEND: expected local or kubernetes" in one_line_error(run("list"), 2)

    monkeypatch.delenv("VLCTL_BACKEND")
    assert "--namespace: only for a cluster" in one_line_error(run("list", "-n", "ml"), 2)
    bad = one_line_error(k8s("list", "-n", "Team_B"), 2)
    assert "--namespace: 'Team_B' is not a valid namespace name" in bad
    # Without a cluster option: the store, as before (another file than the fixture's, which must stay absent).
    monkeypatch.setenv("VLCTL_DATABASE_URL", f"sqlite:///{tmp_path / 'local.db'}")
    assert json.loads(run("list", "-o", "json").stdout) == []
    assert (tmp_path / "local.db").exists()


# ------------------------------------------------------------------------------------------------ list, status


def test_list_and_status_show_what_the_operator_reported(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    pending = json.loads(k8s("status", JOB, "-o", "json").stdout)
    assert (pending["phase"], pending["reason"], pending["conditions"]) == (None, None, [])
    set_status(api, STATUS)

    result = k8s("status", JOB, "-o", "json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert {k: status[k] for k in ("name", "namespace", "phase", "reason", "message")} == {
        "name": JOB,
        "namespace": NAMESPACE,
        "phase": "running",  # the store's spelling
        "reason": "RanksStarted",
        "message": "4 ranks on 2 nodes",
    }
    assert {k: status[k] for k in ("attempt", "restarts", "restarts_counted", "ettr")} == {
        "attempt": 2,
        "restarts": 1,
        "restarts_counted": 1,
        "ettr": 0.93,
    }
    assert (status["step"], status["total_steps"], status["progress"]) == (57, 100, 0.57)
    assert (status["loss"], status["tokens_per_second"]) == (1.25, 1234.0)
    assert status["last_checkpoint_step"] == 40
    assert status["last_checkpoint"] == {
        "step": 40,
        "uri": "s3://checkpoints/vl-sft/step-40",
        "committed_at": "2025-01-01T10:04:00+00:00",  # ISO 8601 as the store's jobs print it
    }
    assert status["stragglers"] == [{"rank": 3, "node": "node-b", "score": 7.5}]
    assert status["excluded_nodes"] == ["node-c"]
    assert status["conditions"] == STATUS["conditions"]
    assert (status["nodes"], status["procs_per_node"]) == (2, 2)

    table = k8s("status", JOB)
    assert table.exit_code == 0, table.output
    assert "ml/vl-sft  running (RanksStarted)" in table.stdout
    assert "rank 3 on node-b (score 7.5)" in table.stdout and "StragglerFlagged" in table.stdout

    rows = json.loads(k8s("list", "-o", "json").stdout)
    assert len(rows) == 1
    assert {k: rows[0][k] for k in ("name", "phase", "step", "restarts", "last_checkpoint_step", "ettr")} == {
        "name": JOB,
        "phase": "running",
        "step": 57,
        "restarts": 1,
        "last_checkpoint_step": 40,
        "ettr": 0.93,
    }
    listed = k8s("list")
    assert re.search(r"vl-sft\s.*running\s.*57 / 100\s.*1\s.*40\s.*93%", listed.stdout), listed.stdout


# ------------------------------------------------------------------------------------------------ events


def event(
    name: str, reason: str, when: str, *, kind: str = "TrainingJob", on: str = JOB, uid: str = ""
) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "vlctl.dev/v1alpha1", "kind": kind, "name": on, "uid": uid},
        "reason": reason,
        "message": f"{reason} happened",
        "type": "Warning" if reason == "RankFailed" else "Normal",
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": 1,
        "source": {"component": "vlctl-operator"},
    }


def test_events_on_the_trainingjob_oldest_first(api: FakeApiServer, spec_file: Path):
    uid = submitted(api, spec_file)["metadata"]["uid"]
    for e in (
        event(f"{JOB}.{uid[:8]}.3", "RankFailed", "2025-01-01T10:03:00Z", uid=uid),
        event(f"{JOB}.{uid[:8]}.1", "Submitted", "2025-01-01T10:00:00Z", uid=uid),
        event(f"{JOB}.{uid[:8]}.2", "RanksStarted", "2025-01-01T10:01:00Z", uid=uid),
        event("other.1", "Submitted", "2025-01-01T09:00:00Z", on="other-job"),
        event(f"{JOB}.pod", "Scheduled", "2025-01-01T09:30:00Z", kind="Pod"),  # a Pod of the same name
        event(f"{JOB}.old.9", "Cancelled", "2024-12-31T00:00:00Z", uid="uid-of-an-earlier-trainingjob"),
    ):
        api.put_object(e)

    result = k8s("events", JOB, "-o", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["seq"], r["reason"], r["type"]) for r in rows] == [
        (1, "Submitted", "Normal"),
        (2, "RanksStarted", "Normal"),
        (3, "RankFailed", "Warning"),
    ]
    assert rows[0] == {
        "seq": 1,
        "time": "2025-01-01T10:00:00Z",
        "type": "Normal",
        "reason": "Submitted",
        "message": "Submitted happened",
        "count": 1,
        "source": "vlctl-operator",
        "uid": uid,
    }
    table = k8s("events", JOB)
    assert re.findall(r"│ (Submitted|RanksStarted|RankFailed) +│", table.stdout) == [
        "Submitted",
        "RanksStarted",
        "RankFailed",
    ]

    # Once the TrainingJob is gone its Events remain for a while (the API server's TTL): still shown.
    api.modify(
        "trainingjobs", NAMESPACE, JOB, lambda o: o["metadata"].update(deletionTimestamp="x", finalizers=[])
    )
    gone = k8s("events", JOB, "-o", "json")
    assert gone.exit_code == 0 and len(json.loads(gone.stdout)) == 4  # the earlier object's one too
    assert "no longer exists" in gone.stderr
    assert "no TrainingJob named 'nope' in namespace ml" in one_line_error(k8s("events", "nope"), 2)


# ------------------------------------------------------------------------------------------------ logs


def launch_pods(api: FakeApiServer, attempt: int, logs: list[str], phase: str = "Running") -> list[str]:
    """The attempt's pods as the operator creates them (k8s/render.py), started, with the given logs."""
    spec = parse_spec({**SPEC, "backend": "kubernetes"})
    names = []
    for obj in render.render_job(
        spec, namespace=NAMESPACE, attempt=attempt, resume_from=None, excluded_nodes=(), image="img", owner=None,
        gang="none", queue=None,
    ):  # fmt: skip
        if obj["kind"] != "Pod":
            continue
        api.put_object(obj)
        index = int(obj["metadata"]["labels"][render.LABEL_NODE_INDEX])
        name = obj["metadata"]["name"]
        api.set_pod_status(
            NAMESPACE, name, phase, exit_code=0 if phase == "Succeeded" else None, node_name=f"node-{index}"
        )
        api.set_pod_log(NAMESPACE, name, logs[index])
        names.append(name)
    return names


NODE0_LOG = "".join(f"n0 line {i}\n" for i in range(30))  # no rank prefixes: the trainer's plain output
NODE1_LOG = (
    "torchrun agent starting\n"
    "[rank2]: rank two, first\n"
    "[rank3]: rank three, first\n"
    "[default1]: rank three by its local rank\n"  # torchrun --tee's default prefix: local rank 1 of node 1
    "[2]: rank two by the ${rank} template\n"
    "torchrun agent done\n"
)


def test_logs_of_the_current_attempts_pods(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    set_status(api, STATUS)  # attempt 2
    launch_pods(api, 1, ["attempt one, node 0\n", "attempt one, node 1\n"], phase="Succeeded")
    pods = launch_pods(api, 2, [NODE0_LOG, NODE1_LOG])

    result = k8s("logs", JOB, "-n", "2", "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [
        {"attempt": 2, "node_index": 0, "pod": pods[0], "node": "node-0", "rank": None, "lines": ["n0 line 28", "n0 line 29"]},
        {
            "attempt": 2,
            "node_index": 1,
            "pod": pods[1],
            "node": "node-1",
            "rank": None,
            "lines": ["[2]: rank two by the ${rank} template", "torchrun agent done"],
        },
    ]  # fmt: skip
    table = k8s("logs", JOB, "-n", "1")
    assert table.stdout.splitlines() == ["[node 0] n0 line 29", "[node 1] torchrun agent done"]

    # Rank 3 lives on node 1 (2 processes per node), whose log is prefixed: that rank's lines alone.
    three = k8s("logs", JOB, "--rank", "3")
    assert three.exit_code == 0, three.output
    assert three.stdout.splitlines() == ["rank three, first", "rank three by its local rank"]
    # Rank 1 lives on node 0, whose log carries no prefixes: the whole pod, said so on stderr.
    one = k8s("logs", JOB, "--rank", "1", "-n", "3")
    assert one.stdout.splitlines() == ["n0 line 27", "n0 line 28", "n0 line 29"]
    assert "no rank prefixes" in one.stderr
    by_node = k8s("logs", JOB, "--node", "node-1", "-n", "1")
    assert by_node.stdout.splitlines() == ["torchrun agent done"]
    earlier = k8s("logs", JOB, "--attempt", "1")
    assert earlier.stdout.splitlines() == ["[node 0] attempt one, node 0", "[node 1] attempt one, node 1"]

    assert "--rank: job 'vl-sft' has ranks 0 to 3" in one_line_error(k8s("logs", JOB, "--rank", "4"), 2)
    assert "has attempts 1 to 2" in one_line_error(k8s("logs", JOB, "--attempt", "3"), 2)
    assert "no TrainingJob named 'nope'" in one_line_error(k8s("logs", "nope"), 2)


def test_logs_follow_streams_until_the_job_ends(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    set_status(api, {**STATUS, "phase": "Succeeded", "conditions": STATUS["conditions"][:1]})
    launch_pods(api, 2, [NODE0_LOG, NODE1_LOG], phase="Succeeded")
    result = k8s("logs", JOB, "--rank", "2", "--follow")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["rank two, first", "rank two by the ${rank} template"]


def test_logs_follow_moves_on_to_the_next_attempt(api: FakeApiServer, spec_file: Path, monkeypatch):
    """The operator restarts the job while `logs --follow` runs: the new attempt's pods are followed too."""
    from cli import cluster_logs

    monkeypatch.setattr(cluster_logs, "FOLLOW_POLL_SECONDS", 0.05)
    submitted(api, spec_file)
    set_status(api, STATUS)  # attempt 2, running
    launch_pods(api, 2, ["attempt two, node 0\n", "attempt two, node 1\n"])

    def restart() -> None:
        while not any(r.resource == "pods/log" for r in api.requests()):
            time.sleep(0.01)
        launch_pods(api, 3, ["attempt three, node 0\n", "attempt three, node 1\n"], phase="Succeeded")
        set_status(api, {**STATUS, "phase": "Succeeded", "attempt": 3})

    operator = threading.Thread(target=restart, daemon=True)
    operator.start()
    result = k8s("logs", JOB, "--follow")
    operator.join(timeout=10)
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.splitlines()[:2]) == [
        "[node 0] attempt two, node 0",
        "[node 1] attempt two, node 1",
    ]
    assert sorted(result.stdout.splitlines()[2:]) == [
        "[node 0] attempt three, node 0",
        "[node 1] attempt three, node 1",
    ]
    assert "--- attempt 3 ---" in result.stderr


def test_logs_of_a_job_never_launched(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    assert "has never been launched" in one_line_error(k8s("logs", JOB), 2)


# ------------------------------------------------------------------------------------------------ cancel


def test_cancel_deletes_the_trainingjob(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    assert "pass --yes" in one_line_error(k8s("cancel", JOB), 2)
    assert api.get("trainingjobs", NAMESPACE, JOB) is not None

    result = k8s("cancel", JOB, "--yes", "-o", "json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert (shown["name"], shown["cancelled"], shown["finalizing"], shown["deleted"]) == (
        JOB,
        True,
        False,
        None,
    )
    assert api.get("trainingjobs", NAMESPACE, JOB) is None
    assert "no TrainingJob named 'vl-sft' in namespace ml" in one_line_error(k8s("cancel", JOB, "--yes"), 2)


def test_cancel_leaves_cleanup_to_the_operators_finalizer(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    api.modify(
        "trainingjobs", NAMESPACE, JOB, lambda o: o["metadata"].update(finalizers=["vlctl.dev/cleanup"])
    )
    set_status(api, STATUS)
    result = k8s("cancel", JOB, "--yes", "-o", "json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["finalizing"] is True and shown["deleted"]
    obj = api.get("trainingjobs", NAMESPACE, JOB)
    assert obj is not None and obj["metadata"]["deletionTimestamp"]
    again = k8s("cancel", JOB, "--yes")
    assert again.exit_code == 0 and "already being deleted" in again.stderr


def test_cancel_refuses_a_job_that_ended(api: FakeApiServer, spec_file: Path):
    submitted(api, spec_file)
    set_status(api, {**STATUS, "phase": "Succeeded"})
    assert "is succeeded" in one_line_error(k8s("cancel", JOB, "--yes"), 2)
    assert api.get("trainingjobs", NAMESPACE, JOB) is not None


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize(
    "args",
    [("list",), ("status", JOB), ("events", JOB), ("logs", JOB), ("cancel", JOB, "--yes"), ("submit",)],
)
def test_an_unreachable_api_server_is_exit_3_naming_it(spec_file: Path, kubeconfig: Path, args):
    args = (*args, str(spec_file)) if args == ("submit",) else args
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][1]["cluster"]["server"]
    line = one_line_error(run(*args, "--context", "down"), 3)
    assert f"cannot reach the Kubernetes API server at {server}" in line


@pytest.mark.parametrize("args", [("status", "nope"), ("cancel", "nope", "--yes"), ("logs", "nope")])
def test_an_unknown_job_is_exit_2(args):
    assert "no TrainingJob named 'nope' in namespace ml" in one_line_error(k8s(*args), 2)


def test_a_forbidden_request_is_exit_1_naming_verb_and_resource(api: FakeApiServer, spec_file: Path):
    api.inject(403, verb="list", resource="trainingjobs")
    line = one_line_error(k8s("list"), 1)
    assert "list trainingjobs.vlctl.dev in namespace ml: forbidden" in line
    api.inject(403, verb="create", resource="trainingjobs")
    assert "create trainingjobs.vlctl.dev vl-sft in namespace ml: forbidden" in one_line_error(
        k8s("submit", str(spec_file)), 1
    )


def test_inside_a_pod_the_service_account_is_used(tmp_path: Path, monkeypatch):
    """KUBERNETES_SERVICE_HOST set and no KUBECONFIG: the pod's token, CA and namespace files."""
    from kubernetes.config import incluster_config

    from cli import cluster_api
    from cli.options import Target
    from k8s import api

    for name, text in (
        ("token", "a-token"),
        ("ca.crt", "not read before a TLS handshake"),
        ("namespace", "team-a"),
    ):
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setattr(api, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "namespace")
    port = closed_port()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    monkeypatch.delenv("KUBECONFIG")

    found = cluster_api.connect(Target(context=None, namespace=None))
    assert (found.server, found.namespace) == (f"https://127.0.0.1:{port}", "team-a")
    line = one_line_error(k8s("list"), 3)
    assert f"cannot reach the Kubernetes API server at https://127.0.0.1:{port}" in line

    (tmp_path / "token").unlink()
    line = one_line_error(k8s("list"), 2)
    assert "the pod's service account (in-cluster): cannot load" in line


def test_a_missing_kubeconfig_is_exit_2(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    line = one_line_error(k8s("status", JOB), 2)
    assert f"kubeconfig {tmp_path / 'absent'}: cannot load the Kubernetes configuration" in line
