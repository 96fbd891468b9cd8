"""The operator against an HTTP stand-in for the Kubernetes API (apiserver.py), through the official client.

No trainer runs: pods are objects whose status the tests set, as a kubelet would. Rank telemetry, where a test
needs it, comes from the trainer's own Prometheus exporters (trainer.telemetry.prometheus) serving on loopback
addresses, one per pod (127.0.0.1, 127.0.0.2, ...), set as the pods' IPs: the operator scrapes them exactly as it
would scrape pods, through the backend's endpoint path. Checkpoints live in fsspec's in-memory file system
(`memory://`), which the controller lists and verifies like object storage.

Operators run in threads of the test process (each with its own API clients and identity), or as their own
processes (`python -m cli.operator`) where a test kills one with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import pytest
import yaml
from apiserver import FakeApiServer
from kubernetes import client, watch
from sqlalchemy import select

from controller.ingest import PrometheusTelemetry
from controller.reconciler import ControllerConfig
from controller.store.migrate import upgrade
from controller.store.models import Event, Job
from controller.store.session import Store, StoreConfig, open_store
from k8s.backend import JobBinding, KubernetesBackend
from k8s.crd import spec_from_object
from k8s.operator import FINALIZER, Operator, OperatorConfig, serve_health
from trainer.contract.checkpoint import FORMAT, MANIFEST, crc_hex, step_dirname
from trainer.contract.telemetry import RankLabels
from trainer.telemetry.prometheus import PrometheusExporter

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "ml"
LEASE_NAMESPACE = "vlctl-system"
GROUP, VERSION, PLURAL = "vlctl.dev", "v1alpha1", "trainingjobs"
T = TypeVar("T")
# The official client still calls urllib3's deprecated getheaders().
pytestmark = pytest.mark.filterwarnings("ignore:HTTPResponse.getheader:DeprecationWarning")

# Small timings: a pass every 0.05 s, a 2 s Lease the leader stops using after 1.5 s unrenewed.
TIMINGS = {
    "poll_seconds": 0.05,
    "lease_seconds": 2.0,
    "renew_deadline_seconds": 1.5,
    "retry_seconds": 0.2,
    "watch_seconds": 2,
    "status_interval_seconds": 0.0,
}


# ------------------------------------------------------------------------------------------------ harness


def wait_for(
    check: Callable[[], T],
    *,
    timeout: float = 15.0,
    what: str = "condition",
    poll: float = 0.02,
    story: Callable[[], str] | None = None,
) -> T:
    """`poll`: seconds between checks (slower where the test shares the cores with ranks it waits for);
    `story`: what a timeout should also print."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}" + (f"\n{story()}" if story else "")
            )
        time.sleep(poll)


def kube(url: str, agent: str = "test") -> client.ApiClient:
    configuration = client.Configuration()
    configuration.host = url
    api_client = client.ApiClient(configuration)
    api_client.user_agent = agent
    return api_client


def training_job(
    name: str,
    *,
    nodes: int = 2,
    procs: int = 1,
    base_port: int = 9500,
    annotations: dict[str, str] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A TrainingJob as `kubectl apply` sends it: checkpoints in memory://, quick backoff."""
    training = {
        "data": {"paths": ["s3://datasets/grounding.jsonl"], "rows_per_step": 4 * nodes * procs},
        "parallel": {"dp": nodes * procs},
        "checkpoint": {"dir": f"memory://checkpoints/{name}-{uuid.uuid4().hex[:8]}"},
        "telemetry": {"base_port": base_port},
    }
    spec: dict[str, Any] = {
        "backend": "kubernetes",
        "resources": {"nodes": nodes, "procs_per_node": procs},
        "training": training,
        "fault_tolerance": {
            "recovery": "restart",  # test_in_place_pods.py has the in-place pods
            "backoff_base_seconds": 0.05,
            "backoff_max_seconds": 0.1,
            "max_restarts": 5,
        },
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    meta: dict[str, Any] = {"name": name, "namespace": NAMESPACE}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "metadata": meta, "spec": spec}


def open_test_store(path: Path) -> Store:
    store = open_store(StoreConfig(url=f"sqlite:///{path}"))
    upgrade(store)
    return store


class OperatorThread:
    """One replica: an Operator run in a thread until `stop()`."""

    def __init__(self, operator: Operator):
        self.operator = operator
        self.identity = operator.config.identity
        self._stop = threading.Event()
        self._thread = threading.Thread(target=operator.run, args=(self._stop,), name=self.identity)
        self._thread.start()

    @property
    def agent(self) -> str:
        return f"vlctl-operator/{self.identity}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), f"{self.identity} did not stop"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    store = open_test_store(tmp_path / "vlctl.db")
    yield store
    store.dispose()


@pytest.fixture
def start_operator(api: FakeApiServer, db: Store, tmp_path: Path) -> Iterator[Callable[..., OperatorThread]]:
    running: list[OperatorThread] = []

    def start(identity: str = "operator-0", store: Store | None = None, **overrides: Any) -> OperatorThread:
        configuration = client.Configuration()
        configuration.host = api.url
        controller = ControllerConfig(runs_root=tmp_path / "runs", lease_seconds=2.0, cancel_grace_seconds=0)
        config = OperatorConfig(
            identity=identity,
            image="registry.example/vlctl/trainer:test",
            lease_namespace=LEASE_NAMESPACE,
            controller=controller,
            **{**TIMINGS, **overrides},
        )
        replica = OperatorThread(Operator(store or db, configuration, config))
        running.append(replica)
        return replica

    yield start
    for replica in running:
        replica.stop()


def create_job(api: FakeApiServer, obj: dict[str, Any]) -> dict[str, Any]:
    custom = client.CustomObjectsApi(kube(api.url, "kubectl"))
    return custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, obj)


def delete_job(api: FakeApiServer, name: str) -> None:
    custom = client.CustomObjectsApi(kube(api.url, "kubectl"))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)


def pods(api: FakeApiServer, job: str, attempt: int | None = None) -> list[dict[str, Any]]:
    selector = f"vlctl.dev/job={job}" + (f",vlctl.dev/attempt={attempt}" if attempt is not None else "")
    return api.objects("pods", NAMESPACE, labels=selector)


def status(api: FakeApiServer, name: str) -> dict[str, Any]:
    obj = api.get(PLURAL, NAMESPACE, name)
    return (obj or {}).get("status") or {}


def condition(api: FakeApiServer, name: str, type_: str) -> dict[str, Any] | None:
    return next((c for c in status(api, name).get("conditions") or [] if c["type"] == type_), None)


def store_job(db: Store, name: str) -> Job | None:
    with db.read() as session:
        return session.scalars(select(Job).where(Job.name == name)).one_or_none()


def store_events(db: Store, name: str, reason: str | None = None) -> list[Event]:
    with db.read() as session:
        stmt = select(Event).join(Job, Job.id == Event.job_id).where(Job.name == name).order_by(Event.seq)
        return [e for e in session.scalars(stmt) if reason is None or e.reason == reason]


def mutations(api: FakeApiServer, agent: str, *, since: int = 0, leases: bool = False) -> list[Any]:
    """Writes `agent` made (leases left out unless asked)."""
    return [
        r
        for r in api.requests()[since:]
        if r.user_agent == agent
        and r.verb in ("create", "update", "patch", "delete")
        and (leases or r.resource != "leases")
    ]


def lease_holder(api: FakeApiServer) -> str | None:
    lease = api.get("leases", LEASE_NAMESPACE, "vlctl-operator")
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


def run_pods(
    api: FakeApiServer, job: str, attempt: int, nodes: list[str], ips: list[str] | None = None
) -> None:
    """The scheduler and kubelet: pod i on `nodes[i]`, Running with IP `ips[i]`."""
    for i, node in enumerate(nodes):
        api.set_pod_status(
            NAMESPACE,
            f"{job}-a{attempt}-n{i}",
            "Running",
            node_name=node,
            pod_ip=ips[i] if ips else f"10.0.0.{i + 1}",
        )


def write_checkpoint(root: str, step: int, world_size: int = 2) -> str:
    """A committed checkpoint in the trainer's layout: shard files, then the manifest (the commit)."""
    fs = fsspec.filesystem("memory")
    folder = f"{root.removeprefix('memory://')}/{step_dirname(step)}"
    files = []
    for rank in range(world_size):
        data = f"shard {rank} of step {step}".encode()
        with fs.open(f"{folder}/__{rank}_0.distcp", "wb") as f:
            f.write(data)
        files.append(
            {
                "path": f"__{rank}_0.distcp",
                "size": len(data),
                "crc32": crc_hex(zlib.crc32(data)),
                "rank": rank,
            }
        )
    manifest = {"format": FORMAT, "step": step, "world_size": world_size, "files": files}
    with fs.open(f"{folder}/{MANIFEST}", "wb") as f:
        f.write(json.dumps(manifest).encode())
    return f"{root}/{step_dirname(step)}"


def torchrun_failure(rank: int, local_rank: int, code: int) -> str:
    """The end of a torchrun agent's log when one of its workers failed (its failure summary)."""
    return "\n".join(
        [
            "[rank3]: Traceback (most recent call last): ...",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
            "============================================================",
            "trainer.train FAILED",
            "------------------------------------------------------------",
            "Failures:",
            "  <NO_OTHER_FAILURES>",
            "------------------------------------------------------------",
            "Root Cause (first observed failure):",
            "[0]:",
            f"  time      : {time.strftime('%Y-%m-%d_%H:%M:%S')}",
            "  host      : pod",
            f"  rank      : {rank} (local_rank: {local_rank})",
            f"  exitcode  : {code} (pid: 4242)",
            "  error_file: <N/A>",
            "============================================================",
            "",
        ]
    )


def free_base_port(hosts: list[str], count: int) -> int:
    """A port P with P .. P+count-1 free on every host."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65000:
            continue
        try:
            for host in hosts:
                for port in range(base, base + count):
                    with socket.socket() as s:
                        s.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range")


class Ranks:
    """Every rank's telemetry endpoint, served by the trainer's exporter on its pod's (loopback) IP."""

    def __init__(self, job: str, *, ips: list[str], nodes: list[str], procs: int, base_port: int):
        self.procs = procs
        self.exporters: list[PrometheusExporter] = []
        for index, (ip, node) in enumerate(zip(ips, nodes, strict=True)):
            for local in range(procs):
                labels = RankLabels(training_job=job, node=node, rank=index * procs + local, local_rank=local)
                static = {"pid": 1000 + labels.rank, "process_start_time_seconds": time.time()}
                self.exporters.append(
                    PrometheusExporter(labels, host=ip, port=base_port + local, static=static)
                )

    def step(self, step: int, *, own_work: dict[int, float] | None = None) -> None:
        """Every rank completes `step` (1 s of wall time); `own_work`: seconds of own work by rank (default 1)."""
        for rank, exporter in enumerate(self.exporters):
            own = (own_work or {}).get(rank, 1.0)
            exporter.update(
                {
                    "step": step,
                    "step_seconds": 1.0 if own <= 1.0 else own,
                    "own_work_seconds": own,
                    "phase_seconds/data": 0.1 * own,
                    "phase_seconds/forward": 0.3 * own,
                    "phase_seconds/backward": 0.5 * own,
                    "phase_seconds/optimizer": 0.1 * own,
                    "phase_seconds/collective_wait": 0.0,
                    "loss": 2.0,
                    "text_tokens": 1000,
                    "last_progress_timestamp_seconds": time.time(),
                }
            )

    def close(self) -> None:
        for exporter in self.exporters:
            exporter.close()


# ------------------------------------------------------------------------------------------------ the stand-in


def test_stand_in_answers_like_the_api_server(api: FakeApiServer) -> None:
    """What the operator relies on, through the official client: 404, 409 AlreadyExists and Conflict, label
    selectors, finalizers, owner garbage collection, watch from a version, 410 Gone past the history."""
    core = client.CoreV1Api(kube(api.url))
    custom = client.CustomObjectsApi(kube(api.url))
    owner = create_job(api, {**training_job("owner"), "metadata": {"name": "owner", "finalizers": ["x/y"]}})
    ref = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    for name, labels in (("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"})):
        core.create_namespaced_config_map(
            NAMESPACE, {"metadata": {"name": name, "labels": labels, "ownerReferences": [ref]}}
        )
    with pytest.raises(client.ApiException) as err:
        core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "a"}})
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "AlreadyExists"
    with pytest.raises(client.ApiException) as err:
        core.read_namespaced_config_map("missing", NAMESPACE)
    assert err.value.status == 404 and json.loads(err.value.body)["kind"] == "Status"

    def names(selector: str) -> list[str]:
        found = core.list_namespaced_config_map(NAMESPACE, label_selector=selector).items
        return [c.metadata.name for c in found]

    assert names("app=x") == ["a"] and names("tier") == ["a"] and names("!tier") == ["b"]
    assert names("app in (x,y),app!=y") == ["a"]

    stale = owner["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "owner", {"metadata": {"labels": {"k": "v"}}}
    )
    with pytest.raises(client.ApiException) as err:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            PLURAL,
            "owner",
            {"metadata": {"resourceVersion": stale, "labels": {"k": "w"}}},
        )
    assert err.value.status == 409 and json.loads(err.value.body)["reason"] == "Conflict"

    seen: list[tuple[str, str]] = []
    start = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "owner")["metadata"][
        "resourceVersion"
    ]

    def follow() -> None:
        for event in watch.Watch().stream(
            core.list_namespaced_config_map, NAMESPACE, resource_version=start, timeout_seconds=2
        ):
            seen.append((event["type"], event["object"].metadata.name))

    watcher = threading.Thread(target=follow)
    watcher.start()
    time.sleep(0.2)
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "owner")
    assert api.get(PLURAL, NAMESPACE, "owner")["metadata"]["deletionTimestamp"]  # a finalizer holds it
    assert len(api.objects("configmaps")) == 2
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "owner", {"metadata": {"finalizers": None}}
    )
    assert api.get(PLURAL, NAMESPACE, "owner") is None and api.objects("configmaps") == []
    watcher.join()
    assert sorted(seen) == [("DELETED", "a"), ("DELETED", "b")]

    api.compact()
    with pytest.raises(client.ApiException) as err:
        list(
            watch.Watch().stream(
                core.list_namespaced_config_map, NAMESPACE, resource_version=start, timeout_seconds=1
            )
        )
    assert err.value.status == 410


# ------------------------------------------------------------------------------------------------ the operator


def test_job_gets_its_pods_service_and_config_then_succeeds(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """A TrainingJob -> finalizer, store job, one pod per node (torchrun, GPUs, memory-backed /dev/shm, owned by
    the job), a headless Service, the attempt's configuration; telemetry moves it to Running; pods that exit 0
    make it Succeeded, with the conditions and counters in its status."""
    ips = ["127.0.0.1", "127.0.0.2"]
    port = free_base_port(ips, 2)
    start_operator()
    created = create_job(api, training_job("vqa", procs=2, base_port=port, resources={"gpus_per_node": 2}))
    wait_for(lambda: len(pods(api, "vqa", 1)) == 2, what="the pods of attempt 1")

    obj = api.get(PLURAL, NAMESPACE, "vqa")
    assert FINALIZER in obj["metadata"]["finalizers"]
    owner = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "name": "vqa",
        "uid": created["metadata"]["uid"],
    }
    for i, pod in enumerate(pods(api, "vqa", 1)):
        assert pod["metadata"]["name"] == f"vqa-a1-n{i}"
        assert pod["metadata"]["ownerReferences"] == [
            {**owner, "controller": True, "blockOwnerDeletion": True}
        ]
        (container,) = pod["spec"]["containers"]
        assert container["command"][:3] == ["python", "-m", "torch.distributed.run"]
        assert f"--node-rank={i}" in container["command"] and "--nproc-per-node=2" in container["command"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]
        assert pod["spec"]["restartPolicy"] == "Never"
        assert "nodeAffinity" not in pod["spec"].get("affinity", {})
    (service,) = api.objects("services", NAMESPACE)
    assert service["metadata"]["name"] == "vqa-a1" and service["spec"]["clusterIP"] == "None"
    (config_map,) = api.objects("configmaps", NAMESPACE)
    config = yaml.safe_load(config_map["data"]["training.yaml"])
    assert config["job_name"] == "vqa" and config["run_dir"] == "runs/train"  # the pods', not the operator's
    assert config["telemetry"] == {**config["telemetry"], "host": "0.0.0.0", "base_port": port}
    assert config["checkpoint"]["resume"] == "none"  # no checkpoint yet
    job = store_job(db, "vqa")
    assert job is not None and job.phase == "launching" and job.current_attempt == 1
    wait_for(lambda: status(api, "vqa").get("phase") == "Launching", what="status Launching")
    assert condition(api, "vqa", "Created")["status"] == "True"

    run_pods(api, "vqa", 1, ["gpu-a", "gpu-b"], ips)
    ranks = Ranks("vqa", ips=ips, nodes=["gpu-a", "gpu-b"], procs=2, base_port=port)
    try:
        ranks.step(0)
        wait_for(lambda: status(api, "vqa").get("phase") == "Running", what="status Running")
        running = status(api, "vqa")
        assert condition(api, "vqa", "Running")["status"] == "True"
        assert running["progress"] == {**running["progress"], "step": 1, "totalSteps": 100, "loss": 2.0}
        for i in range(2):
            api.set_pod_status(NAMESPACE, f"vqa-a1-n{i}", "Succeeded", exit_code=0)
        wait_for(lambda: status(api, "vqa").get("phase") == "Succeeded", what="status Succeeded")
    finally:
        ranks.close()
    done = status(api, "vqa")
    assert condition(api, "vqa", "Succeeded")["status"] == "True"
    assert condition(api, "vqa", "Running")["status"] == "False"
    assert (done["attempt"], done["restarts"], done["observedGeneration"]) == (1, 0, 1)
    # The job's timeline became Kubernetes Events on the object.
    reasons = {e["reason"] for e in api.objects("events", NAMESPACE)}
    assert {"Submitted", "Launched", "RanksStarted", "Completed"} <= reasons


def test_failed_pod_restarts_the_gang_from_the_checkpoint(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """One pod fails: its rank's own exit code is read from torchrun's summary in the pod's log, the attempt's
    objects are deleted, and attempt 2 resumes from the newest committed checkpoint (config, command line,
    annotations)."""
    start_operator()
    obj = training_job("ocr", procs=2)
    root = obj["spec"]["training"]["checkpoint"]["dir"]
    create_job(api, obj)
    wait_for(lambda: len(pods(api, "ocr", 1)) == 2, what="attempt 1")
    run_pods(api, "ocr", 1, ["node-a", "node-b"])
    step_uri = write_checkpoint(root, 40, world_size=4)

    api.set_pod_log(NAMESPACE, "ocr-a1-n1", torchrun_failure(rank=3, local_rank=1, code=97))
    api.set_pod_status(NAMESPACE, "ocr-a1-n1", "Failed", exit_code=1)
    wait_for(lambda: len(pods(api, "ocr", 2)) == 2, what="attempt 2")

    assert pods(api, "ocr", 1) == []
    assert [s["metadata"]["name"] for s in api.objects("services", NAMESPACE)] == ["ocr-a2"]
    assert [c["metadata"]["name"] for c in api.objects("configmaps", NAMESPACE)] == ["ocr-a2-config"]
    for pod in pods(api, "ocr", 2):
        assert pod["metadata"]["annotations"]["vlctl.dev/resume-step"] == "40"
        assert "checkpoint.resume_step=40" in pod["spec"]["containers"][0]["command"]
    config = yaml.safe_load(api.objects("configmaps", NAMESPACE)[0]["data"]["training.yaml"])
    assert config["checkpoint"]["resume"] == "latest" and config["checkpoint"]["resume_step"] == 40
    (failure,) = [e for e in store_events(db, "ocr") if e.type == "Failure"]
    assert failure.data["ranks"] == [3] and "97" in failure.message
    wait_for(lambda: status(api, "ocr").get("attempt") == 2, what="status of attempt 2")
    now = status(api, "ocr")
    assert (
        now["restarts"] == 1
        and now["lastCheckpoint"]["step"] == 40
        and now["lastCheckpoint"]["uri"] == step_uri
    )
    assert condition(api, "ocr", "Restarting") is not None
    warnings = [e for e in api.objects("events", NAMESPACE) if e["type"] == "Warning"]
    assert any("97" in e["message"] for e in warnings)


def test_straggler_node_is_excluded_kept_off_by_affinity_and_cordoned(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """One rank on node-b does three times the work of the others: the controller flags it, decides to exclude
    node-b (a spare is there), restarts the gang, and attempt 2's pods may not land on node-b; with the cordon
    flag node-b is also marked unschedulable."""
    for node in ("node-a", "node-b", "node-c"):
        api.put_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}, "spec": {}})
    ips, nodes = ["127.0.0.1", "127.0.0.2"], ["node-a", "node-b"]
    port = free_base_port(ips, 2)
    start_operator(cordon_excluded_nodes=True)
    create_job(
        api,
        training_job(
            "det",
            procs=2,
            base_port=port,
            resources={"spare_nodes": 1},
            training={
                **training_job("det")["spec"]["training"],
                "parallel": {"dp": 4},
                "training": {"steps": 100000},
                "telemetry": {"base_port": port},
            },
            stragglers={"action": "exclude-node", "window": 5, "persistence": 1, "warmup_steps": 0},
        ),
    )
    wait_for(lambda: len(pods(api, "det", 1)) == 2, what="attempt 1")
    run_pods(api, "det", 1, nodes, ips)
    ranks = Ranks("det", ips=ips, nodes=nodes, procs=2, base_port=port)
    try:
        for step in range(40):
            ranks.step(step, own_work={3: 3.0})
            if pods(api, "det", 2):
                break
            wait_for(
                lambda s=step: (store_job(db, "det").current_step or 0) > s or pods(api, "det", 2),
                what=f"step {step} seen",
            )
        wait_for(lambda: len(pods(api, "det", 2)) == 2, what="attempt 2")
    finally:
        ranks.close()

    (decision,) = store_events(db, "det", "ExcludeNodeDecision")
    assert decision.data["node"] == "node-b" and decision.data["exclude"] is True
    assert any(e.data and e.data.get("rank") == 3 for e in store_events(db, "det", "StragglerFlagged"))
    for pod in pods(api, "det", 2):
        terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"] == [
            {
                "matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-b"]}
                ]
            }
        ]
    wait_for(lambda: status(api, "det").get("excludedNodes") == ["node-b"], what="excludedNodes in status")
    wait_for(lambda: api.get("nodes", None, "node-b")["spec"].get("unschedulable"), what="node-b cordoned")
    assert not api.get("nodes", None, "node-a")["spec"].get("unschedulable")
    assert status(api, "det")["restartsCounted"] == 0  # excluding a straggler is not the job's failure


def test_invalid_spec_fails_with_its_reason_and_launches_nothing(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """A spec the pods could not run (checkpoints on the pod's own disk) -> status Failed with the one-line
    reason; nothing is created. Fixed by the user (a new generation), it is admitted and launched."""
    start_operator()
    obj = training_job("bad")
    obj["spec"]["training"]["checkpoint"]["dir"] = "/checkpoints/bad"
    create_job(api, obj)
    failed = wait_for(lambda: condition(api, "bad", "Failed"), what="the Failed condition")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith(
        "TrainingJob ml/bad: training.checkpoint.dir: '/checkpoints/bad' is on"
    )
    assert "\n" not in failed["message"]
    assert status(api, "bad")["phase"] == "Failed" and status(api, "bad")["observedGeneration"] == 1
    assert store_job(db, "bad") is None and pods(api, "bad") == [] and api.objects("configmaps") == []

    custom = client.CustomObjectsApi(kube(api.url, "kubectl"))
    fixed = {"spec": {"training": {**obj["spec"]["training"], "checkpoint": {"dir": "memory://fixed/bad"}}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "bad", fixed)
    wait_for(lambda: len(pods(api, "bad", 1)) == 2, what="the fixed job's pods")
    wait_for(lambda: status(api, "bad").get("phase") == "Launching", what="status Launching")
    assert status(api, "bad")["observedGeneration"] == 2
    assert condition(api, "bad", "Failed")["status"] == "False"


def test_gang_not_scheduled_in_time_is_torn_down_and_relaunched(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """All or nothing: one pod of the gang stays unscheduled past the scheduling timeout, so the whole gang is
    deleted (the scheduled pod would hold its node at the rendezvous) and launched again, not counted."""
    start_operator(scheduling_timeout_seconds=0.5)
    create_job(api, training_job("gang"))
    wait_for(lambda: len(pods(api, "gang", 1)) == 2, what="attempt 1")
    api.set_pod_status(NAMESPACE, "gang-a1-n0", "Running", node_name="node-a", pod_ip="10.0.0.1")
    wait_for(lambda: len(pods(api, "gang", 2)) == 2, timeout=10, what="attempt 2")
    assert pods(api, "gang", 1) == []
    (failure,) = [e for e in store_events(db, "gang") if e.type == "Failure"]
    assert failure.reason == "NodeLost" and failure.data["counts_toward_limit"] is False


def test_deleted_training_job_leaves_nothing_behind(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """Deleting a running TrainingJob (Volcano gang: with a PodGroup) cancels it, deletes every object of every
    attempt, forgets the store job, then lets the object go by removing the finalizer."""
    start_operator(gang="volcano", queue="research")
    create_job(api, training_job("gone"))
    wait_for(lambda: len(pods(api, "gone", 1)) == 2, what="attempt 1")
    (group,) = api.objects("podgroups", NAMESPACE)
    assert group["spec"] == {"minMember": 2, "queue": "research"}
    run_pods(api, "gone", 1, ["node-a", "node-b"])
    wait_for(lambda: status(api, "gone").get("attempt") == 1, what="status")

    delete_job(api, "gone")
    wait_for(lambda: api.get(PLURAL, NAMESPACE, "gone") is None, what="the TrainingJob to go")
    for plural in ("pods", "services", "configmaps", "podgroups"):
        assert api.objects(plural, NAMESPACE, labels="vlctl.dev/job=gone") == [], plural
    assert store_job(db, "gone") is None
    # The operator deleted them itself (not left to the owner-reference garbage collection).
    deleted = [r for r in mutations(api, "vlctl-operator/operator-0") if r.verb == "delete" and r.code == 200]
    assert {r.resource for r in deleted} == {"pods", "services", "configmaps", "podgroups"}


def test_of_two_replicas_only_the_leader_acts(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """Two replicas: every write comes from the Lease's holder; the standby only reads. A leader whose Lease is
    taken stops writing at once; a leader that stops hands the Lease over and the standby carries on the job."""
    first = start_operator("operator-a")
    wait_for(lambda: lease_holder(api) == "operator-a" and first.operator.leading, what="operator-a to lead")
    second = start_operator("operator-b")
    for replica, role in ((first, "leader"), (second, "standby")):
        server = serve_health(replica.operator, "127.0.0.1", 0)
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.server_port}/healthz", timeout=5
            ) as answer:
                assert answer.status == 200 and answer.read().decode() == f"ok ({role})\n"
        finally:
            server.shutdown()
            server.server_close()
    create_job(api, training_job("duo"))
    wait_for(lambda: len(pods(api, "duo", 1)) == 2, what="attempt 1")
    run_pods(api, "duo", 1, ["node-a", "node-b"])
    wait_for(lambda: status(api, "duo").get("attempt") == 1, what="status")
    assert mutations(api, first.agent) and not mutations(api, second.agent)
    assert {r.verb for r in api.requests() if r.user_agent == second.agent} <= {"get", "list", "watch"}

    # Someone else takes the Lease: the leader sees it on its next renewal and stops writing.
    def steal(lease: dict[str, Any]) -> None:
        lease["spec"].update(holderIdentity="intruder", renewTime=lease["spec"]["renewTime"])
        lease["spec"]["leaseTransitions"] += 1

    api.modify("leases", LEASE_NAMESPACE, "vlctl-operator", steal)
    wait_for(lambda: not first.operator.leading, timeout=5, what="operator-a to stand down")
    mark = len(api.requests())
    api.set_pod_status(NAMESPACE, "duo-a1-n1", "Failed", exit_code=1)
    time.sleep(1.0)  # within the intruder's lease: nobody may act on the failure
    assert not mutations(api, first.agent, since=mark) and not mutations(api, second.agent, since=mark)
    assert pods(api, "duo", 2) == []

    # The intruder never renews: after the lease duration one replica takes over and handles the failure.
    holder = wait_for(
        lambda: lease_holder(api) in ("operator-a", "operator-b") and lease_holder(api), what="a takeover"
    )
    wait_for(lambda: len(pods(api, "duo", 2)) == 2, what="attempt 2")
    leader, standby = (first, second) if holder == "operator-a" else (second, first)
    assert mutations(api, leader.agent, since=mark) and not mutations(api, standby.agent, since=mark)

    # The leader leaves: it releases the Lease, the standby takes over without waiting for it to expire.
    leader.stop()
    wait_for(lambda: lease_holder(api) == standby.identity, timeout=1.5, what="an immediate handover")
    run_pods(api, "duo", 2, ["node-a", "node-c"])
    # Evicted (a lost node, not counted): a second crash before any step would end the job as a crash loop.
    api.set_pod_status(NAMESPACE, "duo-a2-n0", "Failed", reason="Evicted")
    wait_for(lambda: len(pods(api, "duo", 3)) == 2, what="attempt 3, launched by the new leader")
    assert {r.user_agent for r in api.requests() if r.verb == "create" and r.resource == "pods"} == {
        leader.agent,
        standby.agent,
    }
    assert [p["metadata"]["name"] for p in pods(api, "duo")] == ["duo-a3-n0", "duo-a3-n1"]


def test_operator_rides_through_conflicts_lost_replies_errors_and_expired_watches(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread]
) -> None:
    """409 on the finalizer patch and on status writes (read again, retry), a create whose reply was lost (the
    retry meets the object and keeps it), a Service that cannot be created (the half-made attempt is deleted
    and the next one launched), and a watch whose history expired (410: list again)."""
    api.inject(409, verb="patch", resource="trainingjobs")
    api.inject(409, verb="update", resource="trainingjobs/status", count=2)
    api.inject(500, verb="create", resource="services", count=3)
    lost = api.inject(504, verb="create", resource="pods", name="edge-a2-n1", after=True)
    replica = start_operator()
    create_job(api, training_job("edge"))
    wait_for(lambda: len(pods(api, "edge", 2)) == 2, what="attempt 2")
    wait_for(lambda: status(api, "edge").get("attempt") == 2, what="status of attempt 2")

    assert (
        lost.count == 0
        and pods(api, "edge", 1) == []
        and api.objects("configmaps", NAMESPACE, labels="vlctl.dev/attempt=1") == []
    )
    pod_creates = [r for r in api.requests() if r.verb == "create" and r.resource == "pods"]
    assert [(r.name, r.code) for r in pod_creates] == [
        ("edge-a2-n0", 201),
        ("edge-a2-n1", 504),
        ("edge-a2-n1", 409),
    ]
    (failure,) = [e for e in store_events(db, "edge") if e.type == "Failure"]
    assert "launch failed" in failure.message and "500" in failure.message
    codes = [(r.verb, r.resource, r.code) for r in api.requests() if r.user_agent == replica.agent]
    assert ("update", "trainingjobs/status", 409) in codes and ("get", "trainingjobs", 200) in codes
    assert ("patch", "trainingjobs", 409) in codes

    relists = replica.operator.cache.relists
    api.compact()
    client.CustomObjectsApi(kube(api.url, "kubectl")).patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "edge", {"metadata": {"labels": {"team": "vision"}}}
    )
    wait_for(lambda: replica.operator.cache.relists > relists, what="a new list after 410 Gone")
    wait_for(
        lambda: any(
            o["metadata"].get("labels") == {"team": "vision"} for o in replica.operator.cache.snapshot()
        ),
        what="the cache to see the change",
    )
    assert len(pods(api, "edge")) == 2


def test_the_cluster_says_what_exists_and_the_store_follows(
    api: FakeApiServer, db: Store, start_operator: Callable[..., OperatorThread], tmp_path: Path
) -> None:
    """A TrainingJob deleted while no operator ran (its finalizer removed by hand) is forgotten by the store; a
    TrainingJob the store does not know (a replica with its own SQLite file took over) is admitted again, its
    attempts numbered after the one in its status, and the old gang replaced."""
    first = start_operator("operator-a")
    for name in ("kept", "dropped"):
        create_job(api, training_job(name))
        wait_for(lambda n=name: len(pods(api, n, 1)) == 2, what=f"{name}'s pods")
    wait_for(lambda: status(api, "kept").get("attempt") == 1, what="kept's status")
    first.stop()

    custom = client.CustomObjectsApi(kube(api.url, "kubectl"))
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NAMESPACE, PLURAL, "dropped", {"metadata": {"finalizers": None}}
    )
    delete_job(api, "dropped")  # gone at once; the garbage collector takes its pods
    kept_pods = sorted(p["metadata"]["uid"] for p in pods(api, "kept"))
    second = start_operator("operator-b")
    wait_for(lambda: store_job(db, "dropped") is None, what="the store to forget the deleted job")
    wait_for(lambda: store_job(db, "kept").claimed_by == "operator-b", what="operator-b to take kept over")
    assert sorted(p["metadata"]["uid"] for p in pods(api, "kept")) == kept_pods
    second.stop()

    elsewhere = open_test_store(tmp_path / "replica-c.db")
    third = start_operator("operator-c", store=elsewhere)
    try:
        wait_for(lambda: len(pods(api, "kept", 2)) == 2, what="kept relaunched by operator-c as attempt 2")
        assert pods(api, "kept", 1) == []
        assert store_job(elsewhere, "kept").current_attempt == 2
        wait_for(lambda: status(api, "kept").get("attempt") == 2, what="status of attempt 2")
    finally:
        third.stop()
        elsewhere.dispose()


class OperatorProcess:
    """`python -m cli.operator` as its own process, configured through the environment like the Deployment."""

    def __init__(self, api: FakeApiServer, tmp_path: Path, identity: str):
        self.identity = identity
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "stand-in", "cluster": {"server": api.url}}],
                    "users": [{"name": "operator", "user": {"token": "not-checked"}}],
                    "contexts": [
                        {"name": "stand-in", "context": {"cluster": "stand-in", "user": "operator"}}
                    ],
                    "current-context": "stand-in",
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        env |= {
            "KUBECONFIG": str(kubeconfig),
            "VLCTL_DATABASE_URL": f"sqlite:///{tmp_path / 'vlctl.db'}",
            "VLCTL_TRAINER_IMAGE": "registry.example/vlctl/trainer:test",
            "VLCTL_OPERATOR_POD": identity,
            "VLCTL_OPERATOR_NAMESPACE": LEASE_NAMESPACE,
            "VLCTL_OPERATOR_HEALTH_PORT": "0",
            "VLCTL_OPERATOR_METRICS_PORT": "0",
        }
        args = [
            "--poll-seconds",
            "0.05",
            "--lease-seconds",
            "1.5",
            "--renew-deadline",
            "1",
            "--retry-seconds",
            "0.2",
        ]
        args += ["--claim-lease-seconds", "1.5", "--cancel-grace-seconds", "0", "--watch-seconds", "2"]
        args += ["--status-interval", "0", "--runs-root", str(tmp_path / "runs")]
        self.log = tmp_path / f"{identity}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.operator", *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def agent(self) -> str:
        return f"vlctl-operator/{self.identity}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture
def spawn(api: FakeApiServer, tmp_path: Path) -> Iterator[Callable[[str], OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(identity: str) -> OperatorProcess:
        started.append(OperatorProcess(api, tmp_path, identity))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.kill()
        print(f"--- {p.identity}\n{p.log.read_text()[-4000:]}")


def test_operator_killed_mid_launch_or_mid_job_creates_no_duplicate_pods(
    api: FakeApiServer,
    db: Store,
    spawn: Callable[[str], OperatorProcess],
    start_operator: Callable[..., OperatorThread],
) -> None:
    """An operator killed (SIGKILL) inside a launch: its successor reaps the half-made attempt, including a pod
    whose create was still in flight, and launches the next one, uncounted. An operator killed while the job
    runs: its successor re-attaches to the same pods, creates none, and carries on supervising."""
    held = api.inject(None, verb="create", resource="pods", name="solo-a1-n1")
    first = spawn("operator-a")
    create_job(api, training_job("solo"))
    wait_for(held.held.is_set, timeout=30, what="operator-a to be inside the launch")
    first.kill()
    held.release.set()  # its last request still lands: attempt 1 ends up with both pods, and no owner
    wait_for(lambda: len(pods(api, "solo", 1)) == 2, what="the in-flight create")

    second = spawn("operator-b")
    wait_for(lambda: len(pods(api, "solo", 2)) == 2, timeout=30, what="attempt 2 by operator-b")
    assert pods(api, "solo", 1) == []
    job = store_job(db, "solo")
    assert job.num_restarts == 1 and job.num_restarts_counted == 0
    assert [e.reason for e in store_events(db, "solo") if e.type == "PhaseChanged"][-2:] == [
        "LaunchInterrupted",
        "Launched",
    ]
    run_pods(api, "solo", 2, ["node-a", "node-b"])
    wait_for(lambda: status(api, "solo").get("attempt") == 2, what="operator-b's status")
    uids = sorted(p["metadata"]["uid"] for p in pods(api, "solo"))

    second.kill()
    mark = len(api.requests())
    third = start_operator("operator-c")  # in this process: only the one killed needs to be a process
    wait_for(
        lambda: store_job(db, "solo").claimed_by == "operator-c", timeout=30, what="operator-c to take over"
    )
    wait_for(
        lambda: (
            sum(
                r.resource == "pods" and r.verb == "list"
                for r in api.requests()[mark:]
                if r.user_agent == third.agent
            )
            >= 10
        ),
        what="operator-c supervising the gang",
    )
    assert sorted(p["metadata"]["uid"] for p in pods(api, "solo")) == uids
    assert not [r for r in api.requests()[mark:] if r.verb == "create" and r.resource == "pods"]

    api.set_pod_status(NAMESPACE, "solo-a2-n1", "Failed", reason="Evicted")
    wait_for(lambda: len(pods(api, "solo", 3)) == 2, what="attempt 3 by operator-c")
    assert len(pods(api, "solo")) == 2
    third.stop()
    assert lease_holder(api) == ""  # released on the way out


def test_operator_command_rejects_bad_settings_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "VLCTL_"))}
    env |= {"VLCTL_DATABASE_URL": f"sqlite:///{tmp_path / 'vlctl.db'}", "KUBECONFIG": str(tmp_path / "none")}
    for args, message in (
        (["--gang", "slurm"], "error: --gang: must be one of none, volcano, kueue, got 'slurm'"),
        ([], "error: kubeconfig: cannot load the Kubernetes configuration"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "cli.operator", "--image", "trainer:1", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr


def test_prometheus_telemetry_skips_processes_older_than_the_attempts_pods(
    api: FakeApiServer, tmp_path: Path
) -> None:
    """--telemetry prometheus: the job's series come from Prometheus' API; a series whose process started before
    the attempt's pods were created belongs to an earlier attempt (the attempt number is not a label)."""
    spec = spec_from_object(training_job("prom"))
    backend = KubernetesBackend(
        kube(api.url),
        "registry.example/vlctl/trainer:test",
        resolve=lambda name: JobBinding(namespace=NAMESPACE, spec=spec),
        metrics="prometheus",
        prometheus_url="http://prometheus.monitoring:9090",
    )
    labels = {"vlctl.dev/job": "prom", "vlctl.dev/attempt": "3", "vlctl.dev/node-index": "0"}
    pod = api.put_object(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "prom-a3-n0", "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": [{"name": "trainer", "image": "x"}]},
        }
    )
    source = backend.telemetry(
        job_name="prom", run_dir=tmp_path, num_ranks=2, attempt=3, rank_nodes=["n0", "n1"], reattach=True
    )
    assert isinstance(source, PrometheusTelemetry)
    created = datetime.fromisoformat(pod["metadata"]["creationTimestamp"].replace("Z", "+00:00")).timestamp()
    assert (source.training_job, source.attempt, source.launched_at) == ("prom", 3, created)
    assert source.base_url == "http://prometheus.monitoring:9090"
