"""The Kubernetes objects of one attempt of a TrainingJob: pure functions from the spec to manifests (dicts).

`render_job` returns, in creation order: the ConfigMap with the trainer's configuration, the headless Service
for rendezvous, the Volcano PodGroup (gang "volcano" only), and one Pod per node. Everything is named and
labelled by job and attempt, so an attempt is torn down by `attempt_selector` and a new one never collides.

Decisions:

- One Pod per node, each a torchrun agent: `--nnodes=N --node-rank=i --nproc-per-node=P`. Pods rather than a
  Job or JobSet because the operator is the restart policy (a failure restarts the whole gang from a
  checkpoint, torchrun's own `--max-restarts` stays 0, `restartPolicy: Never`) and needs each pod by name.
- Static rendezvous (`--rdzv-backend=static`) at pod 0's stable DNS name through the headless Service
  (`<job>-a<k>-n0.<job>-a<k>.<namespace>.svc`): node i always holds global ranks i*P .. i*P+P-1, as on the local
  backend, so a slow rank maps to its pod and Kubernetes node (the straggler exclusion needs that) and pipeline
  stages land on known nodes. c10d would assign node ranks in join order instead. Pod 0's agent hosts the
  TCPStore; the others retry until it answers, for at most the spec's start-up timeout. The Service publishes
  not-ready addresses so pod 0's name resolves as soon as it has an IP.
- The trainer's configuration is the spec's `training` section in a ConfigMap, with what the operator owns on
  Kubernetes set: `job_name` (the `training_job` metric label) and telemetry on 0.0.0.0 at a fixed base port
  (one container port per local rank, named `metrics-<local_rank>` for the PodMonitor). Both are also set
  through the VLCTL_* environment the trainer reads. Resume is a pair of overrides on the command line
  (`checkpoint.dir`, `checkpoint.resume_step`), so the ConfigMap is the same for every attempt.
- Checkpoints must be in object storage (`s3://...`): a pod's disk goes with the pod, so a restart could not
  resume. Credentials come only by reference: Secrets named by the caller become environment (`envFrom`).
- Relative paths of the configuration (run_dir, data cache) land in /workspace, a scratch emptyDir that is the
  image's working directory; the root file system stays the image's.
- Security: non-root uid 1000, no privilege escalation, all capabilities dropped, the runtime's seccomp
  profile, no service-account token (the trainer never calls the API server), no service links in the env.
- Gangs: "volcano" adds a PodGroup (minMember = nodes) and hands the pods to the volcano scheduler; "kueue" puts
  the pods in a Kueue pod group (queue-name label, group name and total count), which Kueue admits as a whole;
  "none" leaves scheduling to the default scheduler (fine when the cluster is reserved for the job).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from controller.backends.rank_exec import ENV_RANK_BASE, ENV_WORLD_SIZE
from controller.spec import TrainingJobSpec
from trainer.contract.checkpoint import parse_step_dirname
from trainer.contract.telemetry import (
    ENV_ATTEMPT,
    ENV_METRICS_BASE_PORT,
    ENV_METRICS_HOST,
    ENV_NODE,
    ENV_RECOVERY_MEMBER,
    ENV_RECOVERY_STORE,
    ENV_TRAINING_JOB,
)

GangScheduler = Literal["volcano", "kueue", "none"]
GANG_SCHEDULERS = ("volcano", "kueue", "none")

LABEL_JOB = "vlctl.dev/job"
LABEL_ATTEMPT = "vlctl.dev/attempt"
LABEL_NODE_INDEX = "vlctl.dev/node-index"
ANNOTATION_RESUME_STEP = "vlctl.dev/resume-step"
ANNOTATION_RESUME_URI = "vlctl.dev/resume-uri"
COMMON_LABELS = {
    "app.kubernetes.io/name": "vlctl-trainer",
    "app.kubernetes.io/part-of": "vlctl",
    "app.kubernetes.io/managed-by": "vlctl-operator",
}
ENV_NODE_INDEX = "VLCTL_NODE_INDEX"

CONTAINER_NAME = "trainer"
RENDEZVOUS_PORT = 29500
# In-place recovery: the attempt's recovery coordinator (its TCPStore, where the ranks re-form their groups, and
# the HTTP API the operator asks for new rounds) in a pod of its own behind a ClusterIP Service.
COORDINATOR_STORE_PORT = 29600
COORDINATOR_HTTP_PORT = 29601
COORDINATOR_STATE_FILE = "/workspace/coordinator.json"
LABEL_ROLE = "vlctl.dev/role"  # node, spare or coordinator: the pods of an in-place attempt
SPARE_PREFIX = "s"  # hot spare pods are <job>-a<attempt>-s<k>; node pods -n<index>
RENDEZVOUS_PORT_NAME = "rendezvous"
METRICS_BASE_PORT = 9500  # the spec's telemetry.base_port when it sets one
METRICS_PORT_PREFIX = "metrics-"
CONFIG_DIR = "/etc/vlctl"
CONFIG_FILE = "training.yaml"
WORKDIR = "/workspace"
RUN_AS_USER = 1000
# The trainer finishes its step on SIGTERM and saves before exiting (EXIT_PREEMPTED); a large model's save to
# object storage needs minutes.
TERMINATION_GRACE_SECONDS = 600
GPU_RESOURCE = "nvidia.com/gpu"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_OWNER_KEYS = ("apiVersion", "kind", "name", "uid")


# ------------------------------------------------------------------------------------------- names, labels


def service_name(job: str, attempt: int) -> str:
    """The attempt's headless Service; also its PodGroup's and Kueue pod group's name."""
    return f"{job}-a{attempt}"


def pod_group_name(job: str, attempt: int) -> str:
    return service_name(job, attempt)


def config_map_name(job: str, attempt: int) -> str:
    return f"{job}-a{attempt}-config"


def pod_name(job: str, attempt: int, node_index: int) -> str:
    """`<job>-a<attempt>-n<index>`; ValueError when it is not a DNS-1123 label of at most 63 characters."""
    name = f"{job}-a{attempt}-n{node_index}"
    if len(name) > 63:
        raise ValueError(
            f"pod name {name!r} is {len(name)} characters, over the 63 of a DNS label: shorten the job name "
            f"{job!r} (to at most {63 - len(name) + len(job)} characters)"
        )
    if not _DNS1123_LABEL.match(name):
        raise ValueError(f"pod name {name!r} is not a DNS-1123 label: the job name {job!r} is invalid")
    return name


def slot_pod_name(job: str, attempt: int, slot: str) -> str:
    """The pod of a slot: `n<index>` (a node) or `s<k>` (a hot spare); ValueError as `pod_name`."""
    name = f"{job}-a{attempt}-{slot}"
    if len(name) > 63 or not _DNS1123_LABEL.match(name):
        raise ValueError(
            f"pod name {name!r} is not a DNS-1123 label of at most 63 characters: shorten the job name {job!r}"
        )
    return name


def coordinator_name(job: str, attempt: int) -> str:
    """The in-place recovery coordinator's pod and Service."""
    return f"{job}-a{attempt}-coordinator"


def coordinator_store(job: str, attempt: int, namespace: str) -> str:
    """host:port of the coordinator's store for the ranks, through its Service's DNS name."""
    return f"{coordinator_name(job, attempt)}.{namespace}.svc:{COORDINATOR_STORE_PORT}"


def rendezvous_host(job: str, attempt: int, namespace: str) -> str:
    """Pod 0's stable DNS name (the cluster domain comes from the pods' DNS search path)."""
    return f"{pod_name(job, attempt, 0)}.{service_name(job, attempt)}.{namespace}.svc"


def attempt_labels(job: str, attempt: int) -> dict[str, str]:
    return {LABEL_JOB: job, LABEL_ATTEMPT: str(attempt)}


def job_selector(job: str) -> str:
    """A label selector for every object of the job, all attempts."""
    return f"{LABEL_JOB}={job}"


def attempt_selector(job: str, attempt: int) -> str:
    """A label selector for the objects of one attempt."""
    return f"{LABEL_JOB}={job},{LABEL_ATTEMPT}={attempt}"


def metrics_base_port(spec: TrainingJobSpec) -> int:
    return spec.training.telemetry.base_port or METRICS_BASE_PORT


def metrics_ports(spec: TrainingJobSpec) -> dict[str, int]:
    """Container port name -> port, one per local rank."""
    base = metrics_base_port(spec)
    return {f"{METRICS_PORT_PREFIX}{r}": base + r for r in range(spec.resources.procs_per_node)}


# ------------------------------------------------------------------------------------- trainer invocation


def trainer_config(spec: TrainingJobSpec) -> dict[str, Any]:
    """The trainer's configuration as mounted in the pods: the spec's `training` with the operator's fields."""
    config = spec.training.model_dump(mode="json")
    config["job_name"] = spec.name
    config["telemetry"] |= {"host": "0.0.0.0", "base_port": metrics_base_port(spec)}
    return config


def resume_overrides(resume_from: tuple[int, str] | None) -> list[str]:
    """Trainer overrides that load the checkpoint of `step` at `uri` (a step folder, or the root holding it).

    Values are JSON strings, which the trainer's YAML override parser reads back verbatim whatever the URI holds.
    """
    if resume_from is None:
        return []
    step, uri = resume_from
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"resume_from: step must be an int >= 0, got {step!r}")
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"resume_from: uri must be a non-empty string, got {uri!r}")
    head, _, last = uri.rstrip("/").rpartition("/")
    parsed = parse_step_dirname(last)
    if parsed is not None and parsed[0] != step:
        raise ValueError(f"resume_from: {uri!r} is the folder of step {parsed[0]}, not of step {step}")
    root = head if parsed is not None else uri.rstrip("/")
    return [
        f"checkpoint.dir={json.dumps(root)}",
        "checkpoint.resume=latest",
        f"checkpoint.resume_step={step}",
    ]


def torchrun_command(
    spec: TrainingJobSpec, *, node_index: int, master: str, overrides: Sequence[str]
) -> list[str]:
    r = spec.resources
    return [
        "python",
        "-m",
        "torch.distributed.run",
        f"--nnodes={r.nodes}",
        f"--node-rank={node_index}",
        f"--nproc-per-node={r.procs_per_node}",
        "--rdzv-backend=static",
        f"--master-addr={master}",
        f"--master-port={RENDEZVOUS_PORT}",
        f"--rdzv-conf=timeout={int(spec.fault_tolerance.startup_timeout_seconds)}",
        "--max-restarts=0",
        "-m",
        "trainer.train",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
        *overrides,
    ]


def in_place_command(spec: TrainingJobSpec, *, overrides: Sequence[str]) -> list[str]:
    """A node or spare pod under in-place recovery: a torchrun of its own (standalone), so that a pod can die and
    be replaced alone; its ranks get their global ranks from VLCTL_RANK_BASE through rank_exec (a spare's from
    the coordinator) and meet the others through the coordinator's store. rank_exec's log folder `-` keeps the
    ranks' output on the container's (kubectl logs)."""
    return [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={spec.resources.procs_per_node}",
        "--max-restarts=0",
        "-m",
        "controller.backends.rank_exec",
        "-",
        "trainer.train",
        f"{CONFIG_DIR}/{CONFIG_FILE}",
        *overrides,
    ]


# ------------------------------------------------------------------------------------------------ objects


def _meta(
    name: str, namespace: str, labels: Mapping[str, str], owner: Mapping[str, Any] | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {**COMMON_LABELS, **labels}}
    if owner is not None:
        meta["ownerReferences"] = [
            {**{k: owner[k] for k in _OWNER_KEYS}, "controller": True, "blockOwnerDeletion": True}
        ]
    return meta


def config_map(
    spec: TrainingJobSpec, *, namespace: str, attempt: int, owner: Mapping[str, Any] | None
) -> dict[str, Any]:
    text = yaml.safe_dump(trainer_config(spec), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(
            config_map_name(spec.name, attempt), namespace, attempt_labels(spec.name, attempt), owner
        ),
        "data": {CONFIG_FILE: text},
    }


def headless_service(
    spec: TrainingJobSpec, *, namespace: str, attempt: int, owner: Mapping[str, Any] | None
) -> dict[str, Any]:
    labels = attempt_labels(spec.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(spec.name, attempt), namespace, labels, owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [{"name": RENDEZVOUS_PORT_NAME, "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def volcano_pod_group(
    spec: TrainingJobSpec,
    *,
    namespace: str,
    attempt: int,
    owner: Mapping[str, Any] | None,
    queue: str | None,
    hot_spares: int | None = None,
) -> dict[str, Any]:
    group_spec: dict[str, Any] = {"minMember": gang_size(spec, hot_spares)}
    if queue:
        group_spec["queue"] = queue
    return {
        "apiVersion": "scheduling.volcano.sh/v1beta1",
        "kind": "PodGroup",
        "metadata": _meta(
            pod_group_name(spec.name, attempt), namespace, attempt_labels(spec.name, attempt), owner
        ),
        "spec": group_spec,
    }


def gang_size(spec: TrainingJobSpec, hot_spares: int | None) -> int:
    """The pods that must run together: the nodes, and under in-place recovery the hot spares and the
    coordinator (a gang scheduler must not start the ranks without what replaces a lost one)."""
    return spec.resources.nodes + (0 if hot_spares is None else hot_spares + 1)


def _env(
    spec: TrainingJobSpec,
    *,
    namespace: str,
    attempt: int,
    node_index: int | None,
    in_place: bool = False,
    member: str | None = None,
) -> list[dict[str, Any]]:
    """`node_index` None: a hot spare, `member` its name with the coordinator."""
    env: list[dict[str, Any]] = [
        {"name": ENV_TRAINING_JOB, "value": spec.name},
        {"name": ENV_ATTEMPT, "value": str(attempt)},
    ]
    if node_index is not None:
        env.append({"name": ENV_NODE_INDEX, "value": str(node_index)})
    env += [
        # The Kubernetes node, so a straggler's `node` label is what node exclusion keeps the job off.
        {"name": ENV_NODE, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": ENV_METRICS_HOST, "value": "0.0.0.0"},
        {"name": ENV_METRICS_BASE_PORT, "value": str(metrics_base_port(spec))},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if in_place:
        env += [
            {"name": ENV_RECOVERY_STORE, "value": coordinator_store(spec.name, attempt, namespace)},
            {"name": ENV_WORLD_SIZE, "value": str(spec.resources.world_size)},
        ]
        if node_index is not None:
            env.append({"name": ENV_RANK_BASE, "value": str(node_index * spec.resources.procs_per_node)})
        else:
            env.append({"name": ENV_RECOVERY_MEMBER, "value": str(member)})
    if spec.resources.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})  # DeepSpeed would look for CUDA otherwise
    return env


def _resources(spec: TrainingJobSpec) -> dict[str, Any]:
    r = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    for field in ("cpu", "memory"):
        value = getattr(r, field)
        if value is not None:  # checked against the API's grammar when the spec was parsed
            requests[field] = value
    if "memory" in requests:
        limits["memory"] = requests["memory"]  # over it the pod is OOM-killed, not its neighbours
    if r.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(r.gpus_per_node)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(
    spec: TrainingJobSpec,
    *,
    image: str,
    namespace: str,
    attempt: int,
    node_index: int | None,
    master: str,
    overrides: Sequence[str],
    env_secrets: Sequence[str],
    in_place: bool = False,
    member: str | None = None,
) -> dict[str, Any]:
    ports = [
        {"name": name, "containerPort": port, "protocol": "TCP"} for name, port in metrics_ports(spec).items()
    ]
    if node_index == 0 and not in_place:  # pod 0's agent hosts the rendezvous store
        ports.insert(0, {"name": RENDEZVOUS_PORT_NAME, "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    command = (
        in_place_command(spec, overrides=overrides)
        if in_place
        else torchrun_command(spec, node_index=int(node_index or 0), master=master, overrides=overrides)
    )
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "workingDir": WORKDIR,
        "env": _env(
            spec,
            namespace=namespace,
            attempt=attempt,
            node_index=node_index,
            in_place=in_place,
            member=member,
        ),
        "ports": ports,
        "resources": _resources(spec),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "workspace", "mountPath": WORKDIR},
        ],
        "securityContext": _container_security(),
    }
    if env_secrets:
        container["envFrom"] = [{"secretRef": {"name": name}} for name in env_secrets]
    return container


def _container_security() -> dict[str, Any]:
    """Non-root, no privilege escalation, no capabilities (a fresh dict per object: YAML dumps no aliases)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _affinity(spec: TrainingJobSpec, *, attempt: int, excluded_nodes: Sequence[str]) -> dict[str, Any]:
    affinity: dict[str, Any] = {}
    if excluded_nodes:
        term = {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": sorted(set(excluded_nodes))}
        affinity["nodeAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [term]}]
            }
        }
    if spec.resources.gpus_per_node:
        # A GPU node pod owns its machine's GPUs, and a slow rank must map to one machine; CPU-only jobs
        # (demos on a one-node cluster) may share a machine.
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    # Not the in-place coordinator's pod: it needs no machine of its own.
                    "labelSelector": {
                        "matchLabels": attempt_labels(spec.name, attempt),
                        "matchExpressions": [
                            {"key": LABEL_ROLE, "operator": "NotIn", "values": ["coordinator"]}
                        ],
                    },
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    return affinity


def node_pod(
    spec: TrainingJobSpec,
    *,
    namespace: str,
    attempt: int,
    node_index: int | None,
    resume_from: tuple[int, str] | None,
    excluded_nodes: Sequence[str],
    image: str,
    owner: Mapping[str, Any] | None,
    gang: GangScheduler,
    queue: str | None,
    env_secrets: Sequence[str],
    hot_spares: int | None = None,
    spare: int | None = None,
) -> dict[str, Any]:
    """Node `node_index`'s pod; under in-place recovery (`hot_spares` not None) `node_index` None and `spare` k
    render hot spare k, which waits with torch imported and the model built until the coordinator gives it a
    lost node's ranks."""
    job = spec.name
    in_place = hot_spares is not None
    if node_index is None:
        if not in_place or spare is None:
            raise ValueError("spare: a pod without a node index is a hot spare of an in-place job")
        slot = f"{SPARE_PREFIX}{spare}"
        name = slot_pod_name(job, attempt, slot)
        labels = {**attempt_labels(job, attempt), LABEL_ROLE: "spare"}
    else:
        slot = None
        name = pod_name(job, attempt, node_index)
        labels = {**attempt_labels(job, attempt), LABEL_NODE_INDEX: str(node_index)}
        if in_place:
            labels[LABEL_ROLE] = "node"
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/path": "/metrics"}
    if resume_from is not None:
        annotations |= {ANNOTATION_RESUME_STEP: str(resume_from[0]), ANNOTATION_RESUME_URI: resume_from[1]}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": service_name(job, attempt),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [
            _container(
                spec,
                image=image,
                namespace=namespace,
                attempt=attempt,
                node_index=node_index,
                master=rendezvous_host(job, attempt, namespace),
                overrides=resume_overrides(resume_from),
                env_secrets=env_secrets,
                in_place=in_place,
                member=slot,
            )
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(job, attempt)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and data loader workers share memory
            {"name": "workspace", "emptyDir": {}},
        ],
    }
    if affinity := _affinity(spec, attempt=attempt, excluded_nodes=excluded_nodes):
        pod_spec["affinity"] = affinity
    if spec.resources.gpus_per_node:
        pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    _join_gang(
        spec, pod_spec, labels, annotations, attempt=attempt, gang=gang, queue=queue, hot_spares=hot_spares
    )
    metadata = _meta(name, namespace, labels, owner)
    metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _join_gang(
    spec: TrainingJobSpec,
    pod_spec: dict[str, Any],
    labels: dict[str, str],
    annotations: dict[str, str],
    *,
    attempt: int,
    gang: GangScheduler,
    queue: str | None,
    hot_spares: int | None,
) -> None:
    """A pod of the attempt's gang: Volcano's scheduler and group, or Kueue's queue and pod group."""
    if gang == "volcano":
        pod_spec["schedulerName"] = "volcano"
        annotations[VOLCANO_GROUP_ANNOTATION] = pod_group_name(spec.name, attempt)
    elif gang == "kueue":
        labels |= {KUEUE_QUEUE_LABEL: str(queue), KUEUE_GROUP_LABEL: pod_group_name(spec.name, attempt)}
        annotations[KUEUE_GROUP_COUNT_ANNOTATION] = str(gang_size(spec, hot_spares))


def coordinator_service(
    spec: TrainingJobSpec, *, namespace: str, attempt: int, owner: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The coordinator's stable address for the ranks (its pod's IP is known only once it runs)."""
    labels = attempt_labels(spec.name, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(coordinator_name(spec.name, attempt), namespace, labels, owner),
        "spec": {
            "selector": {**labels, LABEL_ROLE: "coordinator"},
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "store", "port": COORDINATOR_STORE_PORT, "targetPort": COORDINATOR_STORE_PORT},
                {"name": "api", "port": COORDINATOR_HTTP_PORT, "targetPort": COORDINATOR_HTTP_PORT},
            ],
        },
    }


def coordinator_pod(
    spec: TrainingJobSpec,
    *,
    namespace: str,
    attempt: int,
    image: str,
    owner: Mapping[str, Any] | None,
    gang: GangScheduler,
    queue: str | None,
    hot_spares: int,
) -> dict[str, Any]:
    """The attempt's recovery coordinator: the store where the ranks re-form their groups and the API the
    operator opens rounds with. Small (one CPU process, no GPU), on any machine."""
    job = spec.name
    name = coordinator_name(job, attempt)
    labels = {**attempt_labels(job, attempt), LABEL_ROLE: "coordinator"}
    annotations: dict[str, str] = {}
    container = {
        "name": "coordinator",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "python",
            "-m",
            "trainer.recovery.coordinator",
            f"--world-size={spec.resources.world_size}",
            f"--state-file={COORDINATOR_STATE_FILE}",
            "--host=0.0.0.0",
            f"--store-port={COORDINATOR_STORE_PORT}",
            f"--http-port={COORDINATOR_HTTP_PORT}",
        ],
        "workingDir": WORKDIR,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
        "ports": [
            {"name": "store", "containerPort": COORDINATOR_STORE_PORT, "protocol": "TCP"},
            {"name": "api", "containerPort": COORDINATOR_HTTP_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "workspace", "mountPath": WORKDIR}],
        "securityContext": _container_security(),
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": [{"name": "workspace", "emptyDir": {}}],
    }
    _join_gang(
        spec, pod_spec, labels, annotations, attempt=attempt, gang=gang, queue=queue, hot_spares=hot_spares
    )
    metadata = _meta(name, namespace, labels, owner)
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


# ----------------------------------------------------------------------------------------------- the attempt


def render_job(
    spec: TrainingJobSpec,
    *,
    namespace: str,
    attempt: int,
    resume_from: tuple[int, str] | None,
    excluded_nodes: Sequence[str],
    image: str,
    owner: Mapping[str, Any] | None,
    gang: GangScheduler = "none",
    queue: str | None = None,
    env_secrets: Sequence[str] = (),
    hot_spares: int | None = None,
) -> list[dict[str, Any]]:
    """Every object of one attempt, in creation order: ConfigMap, Service, [PodGroup], Pods by node index.
    Under in-place recovery (`hot_spares` not None) also the coordinator's Service (after the headless one)
    and pod (first of the pods), and `hot_spares` spare pods after the nodes'.

    `resume_from` is (step, checkpoint uri) to resume from, None to let the trainer follow the spec;
    `owner` the TrainingJob's apiVersion/kind/name/uid; `env_secrets` Secret names for `envFrom`.
    Raises ValueError, naming the argument or spec field, for anything Kubernetes or the trainer would reject.
    """
    _check_arguments(
        spec, namespace=namespace, attempt=attempt, image=image, owner=owner, gang=gang, queue=queue
    )
    if hot_spares is not None:
        if isinstance(hot_spares, bool) or not isinstance(hot_spares, int) or hot_spares < 0:
            raise ValueError(f"hot_spares: must be an int >= 0, got {hot_spares!r}")
        slot_pod_name(spec.name, attempt, "coordinator")  # the coordinator's pod: the attempt's longest name
    for name in env_secrets:
        if not _DNS1123_SUBDOMAIN.match(name):
            raise ValueError(f"env_secrets: {name!r} is not a valid Secret name")
    objects = [
        config_map(spec, namespace=namespace, attempt=attempt, owner=owner),
        headless_service(spec, namespace=namespace, attempt=attempt, owner=owner),
    ]
    if hot_spares is not None:
        objects.append(coordinator_service(spec, namespace=namespace, attempt=attempt, owner=owner))
    if gang == "volcano":
        objects.append(
            volcano_pod_group(
                spec, namespace=namespace, attempt=attempt, owner=owner, queue=queue, hot_spares=hot_spares
            )
        )
    if hot_spares is not None:
        objects.append(
            coordinator_pod(
                spec,
                namespace=namespace,
                attempt=attempt,
                image=image,
                owner=owner,
                gang=gang,
                queue=queue,
                hot_spares=hot_spares,
            )
        )
    objects += [
        node_pod(
            spec,
            namespace=namespace,
            attempt=attempt,
            node_index=i,
            resume_from=resume_from,
            excluded_nodes=excluded_nodes,
            image=image,
            owner=owner,
            gang=gang,
            queue=queue,
            env_secrets=env_secrets,
            hot_spares=hot_spares,
        )
        for i in range(spec.resources.nodes)
    ]
    objects += [
        spare_pod(
            spec,
            namespace=namespace,
            attempt=attempt,
            spare=k,
            resume_from=resume_from,
            excluded_nodes=excluded_nodes,
            image=image,
            owner=owner,
            gang=gang,
            queue=queue,
            env_secrets=env_secrets,
            hot_spares=int(hot_spares),
        )
        for k in range(hot_spares or 0)
    ]
    return objects


def spare_pod(spec: TrainingJobSpec, *, spare: int, hot_spares: int, **pod: Any) -> dict[str, Any]:
    """Hot spare `spare` (`s<spare>`) of an in-place attempt; the replacements started later are rendered here
    too, so they match the attempt's first spares."""
    return node_pod(spec, node_index=None, spare=spare, hot_spares=hot_spares, **pod)


def check_gang(gang: str, queue: str | None) -> None:
    """ValueError unless `gang` is one of GANG_SCHEDULERS and `queue` fits it (Kueue needs one, none takes none)."""
    if gang not in GANG_SCHEDULERS:
        raise ValueError(f"gang: must be one of {', '.join(GANG_SCHEDULERS)}, got {gang!r}")
    if gang == "kueue" and not queue:
        raise ValueError("queue: gang 'kueue' needs the name of a Kueue LocalQueue")
    if gang == "none" and queue:
        raise ValueError(f"queue: {queue!r} is only used with gang 'volcano' or 'kueue'")


def _check_arguments(
    spec: TrainingJobSpec,
    *,
    namespace: str,
    attempt: int,
    image: str,
    owner: Mapping[str, Any] | None,
    gang: str,
    queue: str | None,
) -> None:
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt: must be an int >= 1, got {attempt!r}")
    if not _DNS1123_LABEL.match(namespace or ""):
        raise ValueError(f"namespace: {namespace!r} is not a DNS-1123 label")
    if not image or not image.strip():
        raise ValueError("image: must name the trainer image")
    check_gang(gang, queue)
    if owner is not None and (missing := [k for k in _OWNER_KEYS if not owner.get(k)]):
        raise ValueError(f"owner: missing {', '.join(missing)}")
    service = service_name(spec.name, attempt)
    if not _DNS1035_LABEL.match(service):
        raise ValueError(
            f"name: {spec.name!r} must start with a letter on Kubernetes (it names the Service {service!r})"
        )
    pod_name(spec.name, attempt, spec.resources.nodes - 1)  # the longest name of the attempt
    directory = spec.training.checkpoint.dir
    scheme = directory.partition("://")[0] if "://" in directory else ""
    if scheme in ("", "file", "local"):
        raise ValueError(
            f"training.checkpoint.dir: {directory!r} is on the pod's own disk, which goes with the pod; on "
            "Kubernetes checkpoints must be in object storage (s3://..., gs://...) so a restart can resume"
        )
    ports = metrics_ports(spec).values()
    if max(ports) > 65535 or min(ports) <= RENDEZVOUS_PORT <= max(ports):
        raise ValueError(
            f"training.telemetry.base_port: ports {min(ports)}..{max(ports)} must stay within 65535 and "
            f"clear of the rendezvous port {RENDEZVOUS_PORT}"
        )
