"""In-place recovery on Kubernetes, for real: the operator against the API stand-in, whose pods a stand-in kubelet
(tests/k8s/kubelet.py) runs as local processes that train the mini model, with checkpoints in S3 (moto).

One job, three kills from outside:

1. node pod n1's rank process: the operator gives n1's rank to the hot spare pod s0, which restores it from rank
   0's in-memory replica; every other pod keeps running (same uid, never recreated), n1's pod is left as it
   failed, and a new spare pod s1 is created after the recovery;
2. the coordinator's pod: the ranks train on without it (`CoordinatorLost`);
3. node pod n0's rank process: with no coordinator, in-place recovery is declined with that reason and the job
   restarts from its newest disk checkpoint.

The job succeeds, and every loss record of rank 0 in both attempts equals the others of its step bit for bit."""

from __future__ import annotations

import base64
import json
import logging
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import FakeApiServer
from kubelet import LocalKubelet
from test_operator import (  # noqa: F401 - api, db and start_operator: the operator tests' fixtures
    NAMESPACE,
    OperatorThread,
    api,
    create_job,
    db,
    pods,
    start_operator,
    status,
    store_events,
    store_job,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "controller"))
import train_harness  # noqa: E402
from job_harness import training_section  # noqa: E402

from controller.store.session import Store  # noqa: E402
from k8s.crd import ANNOTATION_ENV_SECRETS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning")

STEPS = 14
KILL_AFTER_STEP = 3


def phase(store: Store, name: str) -> str:
    job = store_job(store, name)
    return "" if job is None else str(job.phase)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A moto S3 server; the operator (this process) and the pods (through a Secret) use it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True).mkdir("ckpt")
    yield env
    server.stop()


def test_a_failed_pod_is_replaced_alone_by_a_spare_pod_from_memory(  # noqa: F811 - fixtures
    api: FakeApiServer,  # noqa: F811
    db: Store,  # noqa: F811
    start_operator: Callable[..., OperatorThread],  # noqa: F811
    s3: dict[str, str],
    tmp_path: Path,
) -> None:
    data = train_harness.make_data(tmp_path / "data")
    api.put_object(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in s3.items()},
        }
    )
    name = "inplace"
    training = training_section(data, tmp_path / "data-cache", steps=STEPS, interval=4)
    training["checkpoint"]["dir"] = f"s3://ckpt/{name}-{uuid.uuid4().hex[:8]}"
    obj = {
        "apiVersion": "vlctl.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {ANNOTATION_ENV_SECRETS: "s3-creds"},
        },
        "spec": {
            "backend": "kubernetes",
            "resources": {"nodes": 2, "procs_per_node": 1},
            "training": training,
            "fault_tolerance": {
                "recovery": "in-place",
                "hot_spares": 1,
                "max_restarts": 2,
                "backoff_base_seconds": 0.5,
                "backoff_max_seconds": 1,
                "hang_timeout_seconds": 120,
                "startup_timeout_seconds": 300,
            },
        },
    }
    kubelet = LocalKubelet(
        api,
        tmp_path / "kubelet",
        namespace=NAMESPACE,
        env={"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")},
    ).start()

    def story() -> str:
        """The job's events, the kubelet's errors, each pod's phase and the end of its log."""
        out = [f"{e.reason}: {e.message}" for e in store_events(db, name)] + kubelet.errors
        for pod in api.objects("pods", NAMESPACE):
            out.append(f"--- {pod['metadata']['name']} {(pod.get('status') or {}).get('phase')}")
            log = kubelet.pod_dir(pod["metadata"]["name"]) / "container.log"
            out += log.read_text(errors="replace").splitlines()[-8:] if log.exists() else []
        return "\n".join(out)

    try:
        start_operator(poll_seconds=0.2)
        create_job(api, obj)
        wait_for(
            lambda: len(pods(api, name, 1)) == 4,
            timeout=120,
            what="the coordinator, 2 nodes and a spare",
            story=story,
        )
        wait_for(
            lambda: all((p.get("status") or {}).get("phase") == "Running" for p in pods(api, name, 1)),
            timeout=120,
            what="the pods running",
            story=story,
        )
        before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, name, 1)}
        assert sorted(before) == [f"{name}-a1-{s}" for s in ("coordinator", "n0", "n1", "s0")]
        group = api.objects("services", NAMESPACE)
        assert f"{name}-a1-coordinator" in [s["metadata"]["name"] for s in group]

        def step() -> int:
            job = store_job(db, name)
            return -1 if job is None or job.current_step is None else job.current_step

        wait_for(
            lambda: step() >= KILL_AFTER_STEP,
            timeout=240,
            what=f"step {KILL_AFTER_STEP}",
            poll=0.2,
            story=story,
        )
        killed_pid = kubelet.kill_worker(f"{name}-a1-n1")
        wait_for(
            lambda: store_events(db, name, "RecoveredInPlace") or phase(db, name) == "failed",
            timeout=180,
            what="the in-place recovery",
            poll=0.2,
            story=story,
        )
        during = {p["metadata"]["name"]: p for p in pods(api, name, 1)}
        # Rank 1's metrics are scraped from the spare pod now (the endpoint the operator publishes for it).
        spare_ip = during[f"{name}-a1-s0"]["status"]["podIP"]
        endpoint = tmp_path / "runs" / name / "vlctl" / "endpoints-attempt-1" / "metrics-rank1.endpoint.json"
        wait_for(
            lambda: endpoint.exists() and f"//{spare_ip}:" in endpoint.read_text(),
            timeout=120,
            what="rank 1's endpoint on the spare pod",
            story=story,
        )
        # 2. The coordinator's pod dies: the ranks train on without it; the next loss takes the restart path.
        kubelet.kill_container(f"{name}-a1-coordinator")
        wait_for(
            lambda: store_events(db, name, "CoordinatorLost"),
            timeout=120,
            what="CoordinatorLost",
            story=story,
        )
        lost_at = step()
        wait_for(lambda: step() > lost_at, timeout=120, what="a step without the coordinator", story=story)
        kubelet.kill_worker(f"{name}-a1-n0")
        wait_for(
            lambda: phase(db, name) in ("succeeded", "failed"),
            timeout=300,
            what="the end of the job",
            poll=0.5,
            story=story,
        )
        job = store_job(db, name)
        events = store_events(db, name)
        messages = [f"{e.reason}: {e.message}" for e in events]
        assert phase(db, name) == "succeeded", (messages, kubelet.errors)

        (started,) = [e for e in events if e.reason == "InPlaceRecoveryStarted"]
        (recovered,) = [e for e in events if e.reason == "RecoveredInPlace"]
        assert (started.data["node"], started.data["spare"]) == ("n1", "s0"), started.message
        assert recovered.data["steps_lost"] <= 1, recovered.message
        # The snapshot step it resumed from: the newest all ranks had committed when n1 died.
        assert recovered.data["step"] >= KILL_AFTER_STEP - 1, recovered.message
        assert {e.data["spare"] for e in events if e.reason == "SpareStarted" and e.attempt == 1} == {"s1"}

        # Replaced alone: right after the recovery every pod that was there still is, with its uid (none was
        # recreated), n1's as it failed; the only pod created since is the spare that replaces s0.
        assert {n: during[n]["metadata"]["uid"] for n in before} == before, sorted(during)
        assert during[f"{name}-a1-n1"]["status"]["phase"] == "Failed"
        assert {n for n in during if n not in before} <= {f"{name}-a1-s1"}, sorted(during)
        assert [n for n in kubelet.started if "-a1-" in n and n.endswith(("-n0", "-n1", "-s0"))] == [
            f"{name}-a1-{s}" for s in ("n0", "n1", "s0")
        ]  # each started once

        # The coordinator lost, then rank 0: declined in place with the reason, one Failure, attempt 2 from the
        # newest disk checkpoint.
        (gone,) = [e for e in events if e.reason == "CoordinatorLost"]
        assert gone.data["exit_code"] == 137, gone.message
        (declined,) = [e for e in events if e.reason == "InPlaceRecoveryDeclined"]
        assert "recovery coordinator ended (exit code 137)" in declined.message, declined.message
        assert job.current_attempt == 2 and len([e for e in events if e.type == "Failure"]) == 1, messages
        assert pods(api, name, 1) == [], "attempt 1's pods outlived it"

        # Every loss record of rank 0, attempt 1's (pod n0, never restarted) and attempt 2's, equals the others
        # of its step, bit for bit: the in-place recovery and the restart alike resumed exactly.
        losses: dict[int, set[float]] = {}
        for attempt in (1, 2):
            path = next(kubelet.pod_dir(f"{name}-a{attempt}-n0").rglob("metrics-rank0.jsonl"))
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if "loss" in r and "step_seconds" in r:
                    losses.setdefault(r["step"], set()).add(r["loss"])
        assert sorted(losses) == list(range(STEPS)), sorted(losses)
        assert all(len(v) == 1 for v in losses.values()), {s: v for s, v in losses.items() if len(v) > 1}
        # The store's phase comes first; the operator mirrors it onto the TrainingJob on a pass of its own (a
        # loaded machine once made it lose its lease during a pass, stand down, and mirror it a pass later).
        wait_for(
            lambda: status(api, name).get("phase") == "Succeeded",
            timeout=60,
            what="the TrainingJob's status Succeeded",
            story=story,
        )
        print(
            f"\n[k8s in-place] rank 1 (pid {killed_pid}, pod n1) killed after step {KILL_AFTER_STEP}: "
            f"{recovered.message}; pods {sorted(before)} kept their uids\n[k8s in-place] {gone.message}; "
            f"then rank 0 killed: {declined.message}"
        )
    finally:
        kubelet.stop()


def _gang_spec(name: str, **sections: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "kubernetes",
        "resources": {"nodes": 2, "procs_per_node": 1},
        "training": {
            "data": {"paths": ["s3://d/x.jsonl"], "rows_per_step": 4},
            "parallel": {"dp": 2},
            "checkpoint": {"dir": f"s3://ckpt/{name}"},
        },
        **sections,
    }


def _launch_gang(api: FakeApiServer, tmp_path: Path, spec: Any) -> tuple[Any, Any]:  # noqa: F811
    """A KubernetesBackend on the API stand-in and the attempt-1 gang it launches for `spec` (no kubelet)."""
    from kubernetes import client as k8s_client

    from k8s.backend import JobBinding, KubernetesBackend

    configuration = k8s_client.Configuration()
    configuration.host = api.url
    backend = KubernetesBackend(
        k8s_client.ApiClient(configuration),
        "registry.example/vlctl/trainer:test",
        resolve=lambda name: JobBinding(namespace=NAMESPACE, spec=spec),
    )
    config = tmp_path / "attempt.json"
    config.write_text(json.dumps({"checkpoint": {"dir": spec.training.checkpoint.dir, "resume": "none"}}))
    gang = backend.launch(
        job_name=spec.name, attempt=1, config_path=config, overrides=[], nodes=2, procs_per_node=1,
        run_dir=tmp_path, hot_spares=spec.fault_tolerance.hot_spares,
    )  # fmt: skip
    return backend, gang


def test_the_in_place_gang_promotes_replaces_and_kills_by_pod(api: FakeApiServer, tmp_path: Path) -> None:  # noqa: F811
    """The Kubernetes gang's in-place calls on the API stand-in alone (no kubelet: the test sets pod states):
    a spare taking a failed slot's place, a lost spare and its replacement, a hung pod deleted, the coordinator's
    end, and the same gang found again from its record by an operator that took over."""

    from controller.backends.base import EXIT_LOST
    from controller.spec import parse_spec

    spec = parse_spec(_gang_spec("gang", fault_tolerance={"recovery": "in-place", "hot_spares": 1}))
    backend, gang = _launch_gang(api, tmp_path, spec)
    names = sorted(p["metadata"]["name"] for p in pods(api, "gang", 1))
    assert names == ["gang-a1-coordinator", "gang-a1-n0", "gang-a1-n1", "gang-a1-s0"]
    assert gang.coordinator_url is None  # not running yet
    for i, pod in enumerate(names):
        api.set_pod_status(NAMESPACE, pod, "Running", pod_ip=f"10.0.0.{i + 1}", node_name="node-a")
    assert gang.coordinator_url == "http://10.0.0.1:29601" and gang.coordinator_exit() is None
    assert gang.live_spares() == ["s0"] and gang.poll() == {"n0": None, "n1": None}
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(api, "gang", 1)}

    api.set_pod_status(NAMESPACE, "gang-a1-n1", "Failed", exit_code=1)
    assert gang.poll() == {"n0": None, "n1": 1}
    gang.promote("s0", replacing="n1")
    assert gang.poll() == {"n0": None, "s0": None} and gang.live_spares() == []
    assert gang.start_spare() == "s1"
    assert {
        p["metadata"]["name"]: p["metadata"]["uid"]
        for p in pods(api, "gang", 1)
        if p["metadata"]["name"] in uids
    } == uids

    # An operator that took over: the same slots, spares and template, from the record alone.
    again = backend.attach(json.loads(json.dumps(gang.record())))
    assert (
        again.poll() == {"n0": None, "s0": None} and again.spares == ["s1"] and again.replaced == {"n1": "s0"}
    )
    backend.kube.delete("Pod", NAMESPACE, "gang-a1-s1")
    assert again.lost_spares() == [("s1", EXIT_LOST)] and again.start_spare() == "s2"
    assert again.kill_ranks([1]) == [] and api.get("pods", NAMESPACE, "gang-a1-s0") is None  # the hung pod
    assert again.poll() == {"n0": None, "s0": EXIT_LOST}
    api.set_pod_status(NAMESPACE, "gang-a1-coordinator", "Failed", exit_code=137)
    assert again.coordinator_exit() == 137
    again.stop_spares()
    assert sorted(p["metadata"]["name"] for p in pods(api, "gang", 1)) == ["gang-a1-n0", "gang-a1-n1"]


def test_by_default_an_in_place_gang_has_no_idle_spare_pod(api: FakeApiServer, tmp_path: Path) -> None:  # noqa: F811
    """A TrainingJob that leaves `hot_spares` unset gets in-place recovery without a spare pod holding a node's
    GPUs: the gang counts the coordinator and the nodes, and a lost node's replacement is made when it is lost
    (the reconciler's `_await_spare` asks for it while the other pods wait), from the attempt's template."""

    from controller.spec import parse_spec
    from k8s.render import gang_size

    spec = parse_spec(_gang_spec("lean"))
    f = spec.fault_tolerance
    assert (f.recovery, f.hot_spares) == ("in-place", 0) and gang_size(spec, f.hot_spares) == 3
    _, gang = _launch_gang(api, tmp_path, spec)
    names = sorted(p["metadata"]["name"] for p in pods(api, "lean", 1))
    assert names == ["lean-a1-coordinator", "lean-a1-n0", "lean-a1-n1"]
    assert gang.live_spares() == [] and gang.can_start_spares
    api.set_pod_status(NAMESPACE, "lean-a1-n1", "Failed", exit_code=1)
    assert gang.start_spare() == "s0"
    spare = api.get("pods", NAMESPACE, "lean-a1-s0")
    assert spare["metadata"]["labels"]["vlctl.dev/role"] == "spare"
