"""The objects of one attempt: valid for Kubernetes, secure, gang-scheduled as asked, and runnable by the trainer
(the mounted configuration and the command-line overrides load with the trainer's own loader)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_cases import BASE, EXAMPLES, K8S_VERSION

from controller.spec import TrainingJobSpec
from k8s.crd import API_VERSION, KIND, spec_from_object
from k8s.render import (
    CONFIG_FILE,
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_NODE_INDEX,
    METRICS_BASE_PORT,
    RENDEZVOUS_PORT,
    attempt_selector,
    pod_name,
    render_job,
    resume_overrides,
)
from trainer.contract.training import load_training_config

NAMESPACE = "ml-research"
IMAGE = "registry.example.com/vlctl/trainer:0.1.0"
EXCLUDED = ["gpu-node-17", "gpu-node-03"]
SECRETS = ("s3-credentials",)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SECRET_LIKE_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.IGNORECASE)

# Volcano's PodGroup is not a core type, so kubernetes-validate has no schema for it: this is the part of
# scheduling.volcano.sh/v1beta1 PodGroup that the renderer writes, with the API's own field types.
PODGROUP_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"enum": ["scheduling.volcano.sh/v1beta1"]},
        "kind": {"enum": ["PodGroup"]},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": DNS_LABEL.pattern},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "ownerReferences": {"type": "array"},
            },
        },
        "spec": {
            "type": "object",
            "required": ["minMember"],
            "additionalProperties": False,
            "properties": {
                "minMember": {"type": "integer", "minimum": 1},
                "queue": {"type": "string", "minLength": 1},
                "priorityClassName": {"type": "string"},
                "minResources": {"type": "object"},
            },
        },
    },
}


def owner_of(obj: dict[str, Any]) -> dict[str, str]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": obj["metadata"]["name"], "uid": "4c1a-uid"}


def resume_point(spec: TrainingJobSpec) -> tuple[int, str]:
    return 400, f"{spec.training.checkpoint.dir}/step-00000400"


def render(obj: dict[str, Any], *, attempt: int, gang: str = "none", **changes: Any) -> list[dict[str, Any]]:
    spec = spec_from_object(obj)
    arguments = {
        "namespace": NAMESPACE,
        "attempt": attempt,
        "resume_from": resume_point(spec) if attempt > 1 else None,
        "excluded_nodes": EXCLUDED if attempt > 1 else [],
        "image": IMAGE,
        "owner": owner_of(obj),
        "gang": gang,
        "queue": {"volcano": "research", "kueue": "gpu-queue"}.get(gang),
        "env_secrets": SECRETS,
    } | changes
    return render_job(spec, **arguments)


def pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "Pod"]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def trainer_args(pod: dict[str, Any]) -> tuple[list[str], str, list[str]]:
    """(torchrun options, config path, trainer overrides) of a pod's command."""
    command = pod["spec"]["containers"][0]["command"]
    split = command.index("trainer.train")
    return command[:split], command[split + 1], command[split + 2 :]


CASES = [
    (path, attempt, gang) for path in EXAMPLES for attempt in (1, 2) for gang in ("volcano", "kueue", "none")
]


@pytest.mark.parametrize(("path", "attempt", "gang"), CASES, ids=[f"{p.stem}-a{a}-{g}" for p, a, g in CASES])
def test_every_object_validates(path: Path, attempt: int, gang: str) -> None:
    objects = render(yaml.safe_load(path.read_text()), attempt=attempt, gang=gang)
    kinds = [o["kind"] for o in objects]
    nodes = spec_from_object(yaml.safe_load(path.read_text())).resources.nodes
    head = ["ConfigMap", "Service", "PodGroup"] if gang == "volcano" else ["ConfigMap", "Service"]
    assert kinds == head + ["Pod"] * nodes
    for obj in objects:
        if obj["kind"] == "PodGroup":
            jsonschema.validate(obj, PODGROUP_SCHEMA)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_pods_are_one_per_node_with_unique_dns_names_and_labels(example: dict[str, Any]) -> None:
    spec = spec_from_object(example)
    for attempt in (1, 2):
        objects = render(example, attempt=attempt)
        names = [p["metadata"]["name"] for p in pods(objects)]
        assert names == [f"{spec.name}-a{attempt}-n{i}" for i in range(spec.resources.nodes)]
        assert all(DNS_LABEL.match(n) and len(n) <= 63 for n in names)
        for index, pod in enumerate(pods(objects)):
            labels = pod["metadata"]["labels"]
            assert (labels[LABEL_JOB], labels[LABEL_ATTEMPT], labels[LABEL_NODE_INDEX]) == (
                spec.name,
                str(attempt),
                str(index),
            )
        for obj in objects:
            assert obj["metadata"]["namespace"] == NAMESPACE
            assert obj["metadata"]["ownerReferences"] == [
                owner_of(example) | {"controller": True, "blockOwnerDeletion": True}
            ]
            assert obj["metadata"]["labels"][LABEL_ATTEMPT] == str(attempt)
        assert attempt_selector(spec.name, attempt) == f"{LABEL_JOB}={spec.name},{LABEL_ATTEMPT}={attempt}"
    first = {p["metadata"]["name"] for p in pods(render(example, attempt=1))}
    second = {p["metadata"]["name"] for p in pods(render(example, attempt=2))}
    assert not first & second  # a new attempt never collides with the old one's pods


def test_pods_run_as_non_root_without_privilege_escalation(example: dict[str, Any]) -> None:
    for pod in pods(render(example, attempt=2)):
        spec = pod["spec"]
        assert (
            spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        )
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        (container,) = spec["containers"]
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "privileged" not in context


def test_resources_gpus_and_shared_memory(example: dict[str, Any]) -> None:
    spec = spec_from_object(example)
    for pod in pods(render(example, attempt=1)):
        (container,) = pod["spec"]["containers"]
        resources = container["resources"]
        gpus = str(spec.resources.gpus_per_node)
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == gpus
        assert resources["requests"]["cpu"] == spec.resources.cpu
        assert resources["requests"]["memory"] == resources["limits"]["memory"] == spec.resources.memory
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory"}
        assert pod["spec"]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
        anti = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["topologyKey"] == "kubernetes.io/hostname"  # one node pod per machine


def test_torchrun_gang_and_static_rendezvous_at_pod_zero(example: dict[str, Any]) -> None:
    spec = spec_from_object(example)
    objects = render(example, attempt=2)
    service = one(objects, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {LABEL_JOB: spec.name, LABEL_ATTEMPT: "2"}
    pod0 = pods(objects)[0]
    host = f"{pod0['spec']['hostname']}.{pod0['spec']['subdomain']}.{NAMESPACE}.svc"
    assert pod0["spec"]["subdomain"] == service["metadata"]["name"]
    for index, pod in enumerate(pods(objects)):
        assert all(pod["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
        options, config, _ = trainer_args(pod)
        assert options[:3] == ["python", "-m", "torch.distributed.run"]
        assert f"--nnodes={spec.resources.nodes}" in options
        assert f"--node-rank={index}" in options
        assert f"--nproc-per-node={spec.resources.procs_per_node}" in options
        assert "--rdzv-backend=static" in options and "--max-restarts=0" in options
        assert f"--master-addr={host}" in options and f"--master-port={RENDEZVOUS_PORT}" in options
        assert config == f"/etc/vlctl/{CONFIG_FILE}"
        mounts = pod["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "config", "mountPath": "/etc/vlctl", "readOnly": True} in mounts
        config_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
        assert config_volume["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]


def test_metrics_ports_env_and_podmonitor_agree(example: dict[str, Any]) -> None:
    spec = spec_from_object(example)
    monitor = yaml.safe_load((BASE / "podmonitor.yaml").read_text())
    (relabel,) = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]
    keep = re.compile(f"^(?:{relabel['regex']})$")  # Prometheus anchors relabel regexes
    for pod in pods(render(example, attempt=1)):
        (container,) = pod["spec"]["containers"]
        scraped = {p["name"]: p["containerPort"] for p in container["ports"] if keep.match(p["name"])}
        expected = {f"metrics-{r}": METRICS_BASE_PORT + r for r in range(spec.resources.procs_per_node)}
        assert scraped == expected
        assert all(len(name) <= 15 for name in scraped)  # an IANA service name
        env = {e["name"]: e for e in container["env"]}
        assert env["VLCTL_TRAINING_JOB"]["value"] == spec.name
        assert env["VLCTL_ATTEMPT"]["value"] == "1"
        assert env["VLCTL_NODE"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        assert env["VLCTL_METRICS_HOST"]["value"] == "0.0.0.0"
        assert env["VLCTL_METRICS_BASE_PORT"]["value"] == str(METRICS_BASE_PORT)
        selector = monitor["spec"]["selector"]["matchExpressions"][0]
        assert selector == {"key": LABEL_JOB, "operator": "Exists"} and LABEL_JOB in pod["metadata"]["labels"]


def test_the_trainer_loads_the_mounted_config_with_the_resume_overrides(
    example: dict[str, Any], tmp_path: Path
) -> None:
    spec = spec_from_object(example)
    step, uri = resume_point(spec)
    objects = render(example, attempt=2)
    config_file = tmp_path / CONFIG_FILE
    config_file.write_text(one(objects, "ConfigMap")["data"][CONFIG_FILE])
    for pod in pods(objects):
        _, _, overrides = trainer_args(pod)
        assert f"checkpoint.resume_step={step}" in overrides
        assert pod["metadata"]["annotations"]["vlctl.dev/resume-step"] == str(step)
        config = load_training_config(str(config_file), overrides)
        assert config.checkpoint.resume_step == step and config.checkpoint.resume == "latest"
        assert config.checkpoint.dir == spec.training.checkpoint.dir == uri.rsplit("/", 1)[0]
        assert config.job_name == spec.name
        assert (config.telemetry.host, config.telemetry.base_port) == ("0.0.0.0", METRICS_BASE_PORT)
        assert config.parallel == spec.training.parallel and config.model == spec.training.model
    for pod in pods(render(example, attempt=1)):
        assert trainer_args(pod)[2] == []  # the first attempt follows the spec's own resume setting


def test_resume_overrides_take_a_step_folder_or_its_root() -> None:
    folder = resume_overrides((12, "s3://bucket/run 7/checkpoints/step-00000012/"))
    root = resume_overrides((12, "s3://bucket/run 7/checkpoints"))
    assert (
        folder
        == root
        == [
            'checkpoint.dir="s3://bucket/run 7/checkpoints"',
            "checkpoint.resume=latest",
            "checkpoint.resume_step=12",
        ]
    )
    assert resume_overrides(None) == []
    with pytest.raises(ValueError, match="is the folder of step 13, not of step 12"):
        resume_overrides((12, "s3://bucket/ckpt/step-00000013"))
    with pytest.raises(ValueError, match="resume_from: step must be an int >= 0"):
        resume_overrides((-1, "s3://bucket/ckpt"))


def test_excluded_nodes_are_kept_off_by_node_affinity(example: dict[str, Any]) -> None:
    for pod in pods(render(example, attempt=2)):
        required = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        (term,) = required["nodeSelectorTerms"]
        assert term["matchExpressions"] == [
            {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": sorted(EXCLUDED)}
        ]
    for pod in pods(render(example, attempt=1)):
        assert "nodeAffinity" not in pod["spec"]["affinity"]


def test_gang_scheduling(example: dict[str, Any]) -> None:
    spec = spec_from_object(example)
    group = f"{spec.name}-a1"
    volcano = render(example, attempt=1, gang="volcano")
    assert one(volcano, "PodGroup")["spec"] == {"minMember": spec.resources.nodes, "queue": "research"}
    assert one(volcano, "PodGroup")["metadata"]["name"] == group
    for pod in pods(volcano):
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == group
    for pod in pods(render(example, attempt=1, gang="kueue")):
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == group
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == str(
            spec.resources.nodes
        )
        assert "schedulerName" not in pod["spec"]
    plain = render(example, attempt=1, gang="none")
    assert not any("kueue" in json.dumps(o) or "volcano" in json.dumps(o) for o in plain)


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (k, *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_secrets_only_by_reference(example: dict[str, Any]) -> None:
    objects = render(example, attempt=2)
    assert "Secret" not in {o["kind"] for o in objects}
    for pod in pods(objects):
        (container,) = pod["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        for env in container["env"]:
            assert not (SECRET_LIKE_ENV.search(env["name"]) and "value" in env), env
    text = " ".join(_strings(objects))
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|password", text, re.IGNORECASE)


def test_cpu_only_jobs_tell_deepspeed_and_skip_gpu_scheduling(example: dict[str, Any]) -> None:
    cpu = copy.deepcopy(example)
    cpu["spec"]["resources"] |= {"gpus_per_node": 0}
    cpu["spec"]["training"]["model"]["dtype"] = "float32"
    for pod in pods(render(cpu, attempt=1)):
        (container,) = pod["spec"]["containers"]
        assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container["env"]
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        assert "tolerations" not in pod["spec"] and "affinity" not in pod["spec"]
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attempt": 0}, "attempt: must be an int >= 1"),
        ({"namespace": "ML"}, "namespace: 'ML' is not a DNS-1123 label"),
        ({"gang": "slurm"}, "gang: must be one of volcano, kueue, none"),
        ({"gang": "kueue", "queue": None}, "queue: gang 'kueue' needs the name of a Kueue LocalQueue"),
        ({"queue": "research"}, "queue: 'research' is only used with gang 'volcano' or 'kueue'"),
        ({"owner": {"apiVersion": API_VERSION, "kind": KIND, "name": "x"}}, "owner: missing uid"),
        ({"env_secrets": ["S3 creds"]}, "env_secrets: 'S3 creds' is not a valid Secret name"),
        ({"image": ""}, "image: must name the trainer image"),
    ],
)
def test_bad_arguments_are_one_line_errors(change: dict[str, Any], message: str) -> None:
    job = yaml.safe_load(EXAMPLES[0].read_text())
    with pytest.raises(ValueError, match=re.escape(message)):
        render(job, **({"attempt": 1} | change))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda j: j["metadata"].update(name="j" * 58), "over the 63 of a DNS label: shorten the job name"),
        (
            lambda j: j["metadata"].update(name="7b-run"),
            "name: '7b-run' must start with a letter on Kubernetes",
        ),
        (
            lambda j: j["spec"]["training"]["checkpoint"].update(dir="checkpoints"),
            "training.checkpoint.dir: 'checkpoints' is on the pod's own disk",
        ),
        (
            lambda j: j["spec"]["training"]["checkpoint"].update(dir="file:///ckpt"),
            "training.checkpoint.dir: 'file:///ckpt' is on the pod's own disk",
        ),
        (
            lambda j: j["spec"]["resources"].update(cpu="32 cores"),
            "resources.cpu: '32 cores' is not a Kubernetes",
        ),
        (
            lambda j: j["spec"]["training"].setdefault("telemetry", {}).update(base_port=29495),
            "training.telemetry.base_port: ports 29495..29502 must stay within 65535 and clear of",
        ),
    ],
)
def test_specs_kubernetes_cannot_run_are_one_line_errors(edit, message: str) -> None:
    job = yaml.safe_load(EXAMPLES[0].read_text())
    edit(job)
    with pytest.raises(ValueError, match=re.escape(message)):
        render(job, attempt=1)


def test_pod_name_limit() -> None:
    assert pod_name("a" * 57, 1, 7) == "a" * 57 + "-a1-n7"  # exactly 63
    with pytest.raises(ValueError, match=r"is 64 characters.*\(to at most 56 characters\)"):
        pod_name("a" * 57, 10, 7)


def test_rendering_is_deterministic(example: dict[str, Any]) -> None:
    assert render(example, attempt=2, gang="volcano") == render(example, attempt=2, gang="volcano")
    shuffled = render(example, attempt=2, excluded_nodes=list(reversed(EXCLUDED)))
    assert shuffled == render(example, attempt=2)


@pytest.mark.parametrize("gang", ["volcano", "kueue", "none"])
def test_in_place_attempts_add_the_coordinator_and_spare_pods(example: dict[str, Any], gang: str) -> None:
    """`recovery: in-place`: the coordinator's Service and pod, the nodes' pods each a torchrun of its own with
    its first global rank, and the hot spares, all counted in the gang; every object validates."""
    spec = spec_from_object(example)
    objects = render(example, attempt=2, gang=gang, hot_spares=2)
    name, nodes, per_node = spec.name, spec.resources.nodes, spec.resources.procs_per_node
    head = ["ConfigMap", "Service", "Service", *(["PodGroup"] if gang == "volcano" else [])]
    assert [o["kind"] for o in objects] == head + ["Pod"] * (1 + nodes + 2)
    for obj in objects:
        if obj["kind"] == "PodGroup":
            jsonschema.validate(obj, PODGROUP_SCHEMA)
            assert obj["spec"]["minMember"] == nodes + 2 + 1
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    coordinator, *workers = pods(objects)
    roles = [p["metadata"]["labels"]["vlctl.dev/role"] for p in pods(objects)]
    assert roles == ["coordinator"] + ["node"] * nodes + ["spare", "spare"]
    assert [p["metadata"]["name"] for p in workers[nodes:]] == [f"{name}-a2-s0", f"{name}-a2-s1"]
    service = [o for o in objects if o["kind"] == "Service"][1]
    assert service["metadata"]["name"] == coordinator["metadata"]["name"] == f"{name}-a2-coordinator"
    assert service["spec"]["selector"]["vlctl.dev/role"] == "coordinator"
    command = coordinator["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "trainer.recovery.coordinator"]
    assert f"--world-size={nodes * per_node}" in command
    assert "resources" in coordinator["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(coordinator)  # needs no machine of the ranks'
    store = f"{name}-a2-coordinator.{NAMESPACE}.svc:29600"
    for i, pod in enumerate(workers):
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["VLCTL_RECOVERY_STORE"] == store and env["VLCTL_WORLD_SIZE"] == str(nodes * per_node)
        assert (
            "--standalone" in container["command"] and "controller.backends.rank_exec" in container["command"]
        )
        assert "checkpoint.resume_step=400" in container["command"]  # the attempt's resume point, spares too
        if i < nodes:
            assert env["VLCTL_RANK_BASE"] == str(i * per_node) and "VLCTL_RECOVERY_MEMBER" not in env
        else:
            assert env["VLCTL_RECOVERY_MEMBER"] == f"s{i - nodes}" and "VLCTL_RANK_BASE" not in env
            assert "vlctl.dev/node-index" not in pod["metadata"]["labels"]
    for pod in pods(objects):
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
        if gang == "kueue":
            count = pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"]
            assert count == str(nodes + 2 + 1)
    if spec.resources.gpus_per_node:  # the GPU nodes' anti-affinity leaves the coordinator out
        term = workers[0]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        assert term[0]["labelSelector"]["matchExpressions"][0]["values"] == ["coordinator"]
    assert render(example, attempt=1, gang=gang) == render(example, attempt=1, gang=gang, hot_spares=None)
