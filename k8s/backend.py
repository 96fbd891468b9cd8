"""The Kubernetes backend: one attempt of a job is a gang of pods, one per node.

`launch` creates the attempt's ConfigMap, headless Service, Volcano PodGroup (gang "volcano") and pods; the gang
handle reads the pods back (`poll`), stops them (`cancel`), and is found again from its record or its labels
(`attach`). The controller core drives it exactly like the local backend; slots `n0, n1, ...` stand for nodes,
and the scheduler places each slot's pod on a machine, kept off excluded machines by node affinity.

Decisions:

- The objects of an attempt are `k8s.render`'s. The job's namespace, spec (the one the controller runs), owner
  reference and Secrets come from `resolve` (-> `JobBinding`, the operator's TrainingJob binding): one operator
  serves TrainingJobs in every namespace. Every call goes through `k8s.api.KubeApi`, on dicts.
- The attempt's configuration is the one the controller wrote (`config_path`: the checkpoint interval in effect
  and `checkpoint.resume_step`, chosen and verified by the controller); it goes into the ConfigMap with the
  pod-side fields in place of the controller's own (`pod_config`), and the resume point onto the pods' command
  line. `overrides` and `env` are added to every pod.
- Idempotent launch: an object that already exists is accepted when it carries this job's and attempt's labels,
  the same owner and no deletion in progress (a create whose answer was lost and retried); anything else under
  that name fails the launch. A launch that fails half-way deletes what it created.
- Exit codes (`poll`), per slot: Succeeded -> 0; Failed -> the container's exit code; gone, replaced (another
  uid), being deleted by someone else, evicted, or on a node that stopped reporting -> EXIT_LOST; unscheduled
  past the scheduling timeout -> EXIT_LOST, which fails the whole gang: with no gang scheduler this is the
  all-or-nothing rule (a partial gang would hold its nodes while waiting at the rendezvous); a container that
  cannot start (image, configuration) past the timeout -> 1. A code, once read, is kept: after `cancel` deletes
  the pods, the failed node still reports its own code and the others report SIGTERM (stopped by us).
- Per-rank exit codes come from the failed pod's log: torchrun prints its failure summary there (global rank,
  the worker's own code, root cause first), read once when the pod is first seen failed, before anyone deletes
  it. A pod without a summary yields its container's code for its first rank.
- `cancel` deletes the attempt's objects with the grace period given (the trainer saves on SIGTERM) and waits
  for the pods to go, at most the grace period and a margin, as the local backend waits for its processes.
  Pods of an attempt that ended on its own (success, or every node failed) stay for their logs until the next
  launch reaps them or the TrainingJob is deleted.
- Telemetry: Prometheus' API, or each rank's endpoint on its pod's IP (`base_port + local_rank`). The ingest's
  `EndpointTelemetry` finds endpoints through the trainer's endpoint files (`trainer.contract.telemetry`);
  `PodEndpointTelemetry` writes those files from the pod list and lets it scrape.
- Stack dumps need `pods/exec`, which the operator's role does not grant: `dump_stacks` returns none.
- In-place recovery (`hot_spares` given): the attempt also has the coordinator's pod and Service and spare pods
  (`k8s.render`). The gang maps slots to pods by name (`<job>-a<k>-<slot>`), so a spare promoted into a lost
  slot's place needs no label change (no `patch` in the role) and an operator that takes over finds the same
  mapping in the record, with the template new spares are made from. The coordinator's API is reached at its
  pod's IP, like the ranks' metrics.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import urllib3
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.backends.base import EXIT_LOST
from controller.backends.torchrun_log import WorkerExit, node_exits, parse_failures, root_causes
from controller.ingest import EndpointTelemetry, PrometheusTelemetry, TelemetryUpdate
from controller.spec import TrainingJobSpec
from k8s import render
from k8s.api import KubeApi, api_error, parse_time
from trainer.contract.telemetry import ENDPOINT_FILE, ENV_RECOVERY_MEMBER

log = logging.getLogger(__name__)

GangMode = render.GangScheduler
MetricsSource = Literal["endpoints", "prometheus"]
GANG_MODES = ("none", "volcano", "kueue")  # render.GANG_SCHEDULERS in the order `vlctl operator --gang` lists
METRICS_SOURCES = ("endpoints", "prometheus")
SLOT_PREFIX = "n"
STOPPED_BY_US = -int(signal.SIGTERM)  # a node `cancel` stopped while it ran (Popen style: killed by SIGTERM)
# Container states that will not resolve by waiting: fail the node once the scheduling timeout is over.
_CANNOT_START = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
CREATE_RETRY_SECONDS = (0.2, 1.0, None)  # waits between tries of a create; None: the last try
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
_LOST_REASONS = frozenset({"Evicted", "NodeLost", "Preempting", "Terminated", "UnexpectedAdmissionError"})


# ------------------------------------------------------------------------------------------------ jobs


@dataclass(frozen=True, slots=True)
class JobBinding:
    """What the backend needs to know about a job beyond its name: where it lives and what it runs."""

    namespace: str
    spec: TrainingJobSpec  # the spec the controller runs (its store's), not a later edit of the object
    owner: Mapping[str, str] | None = None  # the TrainingJob's apiVersion, kind, name, uid
    env_secrets: tuple[str, ...] = ()


def slot_names(nodes: int) -> list[str]:
    return [f"{SLOT_PREFIX}{i}" for i in range(nodes)]


def pod_config(controller_config: Mapping[str, Any], spec: TrainingJobSpec) -> dict[str, Any]:
    """The controller's attempt configuration (checkpoint interval, resume step) with the fields the pods need in
    place of the controller's own: its run folder is on the operator's disk, its telemetry on loopback."""
    pod_side = render.trainer_config(spec)
    config = dict(controller_config)
    for key in ("run_dir", "job_name", "telemetry"):
        config[key] = pod_side[key]
    return config


def resume_point(config: Mapping[str, Any]) -> tuple[int, str] | None:
    """(step, checkpoint root) an attempt resumes from, from the controller's configuration of it."""
    checkpoint = config.get("checkpoint") or {}
    step = checkpoint.get("resume_step")
    if checkpoint.get("resume") == "none" or step is None:
        return None
    return int(step), str(checkpoint["dir"])


class KubernetesBackend:
    def __init__(
        self,
        api_client: client.ApiClient,
        image: str,
        *,
        resolve: Callable[[str], JobBinding],
        gang: GangMode = "none",
        queue: str | None = None,
        scheduling_timeout_seconds: float | None = 300.0,
        metrics: MetricsSource = "endpoints",
        prometheus_url: str | None = None,
        clock: Callable[[], float] = time.time,
        request_timeout_seconds: float = 30.0,
        cancel_poll_seconds: float = 0.5,
    ):
        """`resolve(job name)`: the job's namespace, spec, owner and Secrets (the operator's TrainingJob binding);
        LookupError when the job has none. `scheduling_timeout_seconds` None: wait for the scheduler forever (a
        queue such as Kueue or Volcano admits the gang when it fits)."""
        render.check_gang(gang, queue)
        if metrics not in METRICS_SOURCES:
            raise ValueError(f"metrics: must be one of {', '.join(METRICS_SOURCES)}, got {metrics!r}")
        if metrics == "prometheus" and not prometheus_url:
            raise ValueError("prometheus_url: metrics 'prometheus' needs the Prometheus server's URL")
        if scheduling_timeout_seconds is not None and not scheduling_timeout_seconds > 0:
            raise ValueError(f"scheduling_timeout_seconds: must be > 0, got {scheduling_timeout_seconds}")
        if not image or not image.strip():
            raise ValueError("image: must name the trainer image")
        self.kube = KubeApi(api_client, timeout_seconds=request_timeout_seconds)
        self.image = image
        self.gang = gang
        self.queue = queue
        self.scheduling_timeout_seconds = scheduling_timeout_seconds
        self.metrics = metrics
        self.prometheus_url = prometheus_url
        self.clock = clock
        self.cancel_poll_seconds = cancel_poll_seconds
        self._resolve = resolve

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of object an attempt has, in creation order."""
        return ("ConfigMap", "Service", *(("PodGroup",) if self.gang == "volcano" else ()), "Pod")

    def binding(self, job_name: str) -> JobBinding:
        try:
            return self._resolve(job_name)
        except LookupError as err:
            raise LookupError(f"job {job_name}: no TrainingJob is bound to it ({err})") from None

    # ------------------------------------------------------------------------------------ Backend protocol

    def node_slots(self, *, nodes: int, spares: int, excluded: Collection[str]) -> list[str] | None:
        """Always the slots n0.. n(nodes-1): excluded machines are kept out by the pods' node affinity."""
        return slot_names(nodes)

    def launch(
        self,
        *,
        job_name: str,
        attempt: int,
        config_path: str | Path,
        overrides: Sequence[str],
        nodes: int,
        procs_per_node: int,
        run_dir: str | Path,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
        excluded: Collection[str] = (),
        hot_spares: int | None = None,
    ) -> KubernetesGang:
        """`hot_spares` not None: in-place recovery, with the coordinator's pod and Service and that many spare
        pods started with the gang."""
        b = self.binding(job_name)
        r = b.spec.resources
        if (nodes, procs_per_node) != (r.nodes, r.procs_per_node):
            raise ValueError(
                f"nodes, procs_per_node: {nodes} x {procs_per_node} differs from the job's resources "
                f"{r.nodes} x {r.procs_per_node}"
            )
        names = list(names) if names is not None else slot_names(nodes)
        if len(names) != nodes or len(set(names)) != nodes:
            raise ValueError(f"names: expected {nodes} distinct slot names, got {names}")
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{config_path}: cannot read the attempt's configuration ({err})") from None
        pods = dict(
            namespace=b.namespace,
            resume_from=resume_point(config),
            excluded_nodes=sorted(set(excluded)),
            image=self.image,
            owner=b.owner,
            gang=self.gang,
            queue=self.queue,
            env_secrets=b.env_secrets,
        )
        objects = render.render_job(b.spec, attempt=attempt, hot_spares=hot_spares, **pods)
        objects[0]["data"][render.CONFIG_FILE] = yaml.safe_dump(pod_config(config, b.spec), sort_keys=False)

        def extend(pod: dict[str, Any]) -> None:
            container = pod["spec"]["containers"][0]
            container["command"] += list(overrides)
            container["env"] += [{"name": k, "value": str(v)} for k, v in (env or {}).items()]

        for obj in objects:
            if obj["kind"] == "Pod" and (obj["metadata"]["labels"].get(render.LABEL_ROLE) != "coordinator"):
                extend(obj)
        template = None
        if hot_spares is not None:  # the spares started later (a lost one's replacement) are made from it
            template = render.spare_pod(b.spec, attempt=attempt, spare=0, hot_spares=hot_spares, **pods)
            extend(template)
        gang = KubernetesGang(
            kube=self.kube,
            namespace=b.namespace,
            job_name=job_name,
            attempt=attempt,
            names=names,
            procs_per_node=procs_per_node,
            launched_at=self.clock(),
            scheduling_timeout_seconds=self.scheduling_timeout_seconds,
            kinds=self.kinds,
            clock=self.clock,
            cancel_poll_seconds=self.cancel_poll_seconds,
            spare_template=template,
        )
        try:
            for obj in objects:
                created = self._create(obj, b, job_name, attempt)
                if obj["kind"] != "Pod":
                    continue
                labels = obj["metadata"]["labels"]
                if render.LABEL_NODE_INDEX in labels:
                    gang.pod_uids[names[int(labels[render.LABEL_NODE_INDEX])]] = created["metadata"]["uid"]
                elif labels.get(render.LABEL_ROLE) == "spare":
                    slot = gang.slot_of(obj["metadata"]["name"])
                    gang.pod_uids[slot] = created["metadata"]["uid"]
                    gang.spares.append(slot)
                    gang.spare_count += 1
        except BaseException:
            gang.cancel(0)
            raise
        log.info("job %s: attempt %d launched as %d pod(s) in %s", job_name, attempt, nodes, b.namespace)
        return gang

    def _create(self, obj: dict[str, Any], b: JobBinding, job_name: str, attempt: int) -> dict[str, Any]:
        """Create, retrying a server error or a lost reply: the retry then meets the first try's object."""
        for delay in CREATE_RETRY_SECONDS:
            try:
                return self.kube.create(obj)
            except ApiException as err:
                if err.status == 409:
                    break
                if err.status not in RETRIED_STATUSES or delay is None:
                    raise
            except urllib3.exceptions.HTTPError:
                if delay is None:
                    raise
            time.sleep(delay)
        meta = obj["metadata"]
        existing = self.kube.read(obj["kind"], meta["namespace"], meta["name"])
        labels = existing["metadata"].get("labels") or {}
        owners = {o.get("uid") for o in existing["metadata"].get("ownerReferences") or []}
        ours = (
            labels.get(render.LABEL_JOB) == job_name
            and labels.get(render.LABEL_ATTEMPT) == str(attempt)
            and not existing["metadata"].get("deletionTimestamp")
            and (b.owner is None or b.owner["uid"] in owners)
        )
        if not ours:
            raise RuntimeError(
                f"{obj['kind']} {meta['namespace']}/{meta['name']} already exists and is not attempt {attempt} "
                f"of job {job_name} (another job's, or still being deleted)"
            )
        return existing

    def attach(self, record: Mapping[str, Any]) -> KubernetesGang:
        try:
            return KubernetesGang(
                kube=self.kube,
                namespace=str(record["namespace"]),
                job_name=str(record["job_name"]),
                attempt=int(record["attempt"]),
                names=[str(n) for n in record["nodes"]],
                procs_per_node=int(record["procs_per_node"]),
                launched_at=float(record["launched_at"]),
                scheduling_timeout_seconds=self.scheduling_timeout_seconds,
                kinds=tuple(record.get("kinds") or self.kinds),
                clock=self.clock,
                cancel_poll_seconds=self.cancel_poll_seconds,
                pod_uids=dict(record.get("pod_uids") or {}),
                spares=[str(n) for n in record.get("spares") or []],
                spare_count=int(record.get("spare_count") or 0),
                replaced={str(k): str(v) for k, v in (record.get("replaced") or {}).items()},
                spare_template=record.get("spare_template"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"gang record: missing or invalid field {err}") from err

    def reap(self, job_name: str, *, keep: Sequence[str] = ()) -> int:
        """Delete every object of `job_name` whose attempt is not in `keep` (attempt numbers); returns the
        number of pods deleted. The controller calls it before a launch: nothing of the job's may run then."""
        try:
            namespace = self.binding(job_name).namespace
        except LookupError:
            return 0
        pods = 0
        for kind in reversed(self.kinds):  # pods first: they use the rest
            for obj in self.kube.list(kind, namespace, render.job_selector(job_name)):
                meta = obj["metadata"]
                if (meta.get("labels") or {}).get(render.LABEL_ATTEMPT) in keep:
                    continue
                if self.kube.delete(kind, namespace, meta["name"]) and kind == "Pod":
                    pods += 1
        return pods

    def remove_job(self, job_name: str, namespace: str) -> int:
        """Delete every object of the job (all attempts); returns how many are still there (being deleted)."""
        left = 0
        for kind in reversed(self.kinds):
            for obj in self.kube.list(kind, namespace, render.job_selector(job_name)):
                if not obj["metadata"].get("deletionTimestamp"):
                    self.kube.delete(kind, namespace, obj["metadata"]["name"])
            left += len(self.kube.list(kind, namespace, render.job_selector(job_name)))
        return left

    def telemetry(
        self,
        *,
        job_name: str,
        run_dir: Path,
        num_ranks: int,
        attempt: int,
        rank_nodes: Sequence[str],
        reattach: bool,
    ) -> PodEndpointTelemetry | PrometheusTelemetry:
        b = self.binding(job_name)
        if self.metrics == "prometheus":
            assert self.prometheus_url is not None
            # Series of processes started before the attempt's pods were created belong to an older attempt.
            pods = self.kube.list("Pod", b.namespace, render.attempt_selector(job_name, attempt))
            created = [parse_time(p["metadata"].get("creationTimestamp")) for p in pods]
            started = min((t.timestamp() for t in created if t is not None), default=None)
            return PrometheusTelemetry(
                self.prometheus_url, job_name, attempt, num_ranks, launched_at=started or self.clock()
            )
        return PodEndpointTelemetry(
            self.kube,
            namespace=b.namespace,
            job_name=job_name,
            attempt=attempt,
            num_ranks=num_ranks,
            rank_nodes=rank_nodes,
            base_port=render.metrics_base_port(b.spec),
            folder=Path(run_dir) / "vlctl" / f"endpoints-attempt-{attempt}",
        )


# ------------------------------------------------------------------------------------------------ the gang


@dataclass(kw_only=True, eq=False)
class KubernetesGang:
    kube: KubeApi
    namespace: str
    job_name: str
    attempt: int
    names: list[str]  # slot names; slot i is the pod with node index i
    procs_per_node: int
    launched_at: float
    scheduling_timeout_seconds: float | None
    kinds: tuple[str, ...]
    clock: Callable[[], float] = time.time
    cancel_poll_seconds: float = 0.5
    pod_uids: dict[str, str] = field(default_factory=dict)  # slot -> uid of the pod created for it
    # In-place recovery (None / empty on the restart path): the spare pods' slots not given ranks yet, how many
    # spares were ever started (the next one's number), each lost slot with the spare that took its place, and
    # the pod a new spare is made from (in the record: an operator that took over starts spares too).
    spares: list[str] = field(default_factory=list)
    spare_count: int = 0
    replaced: dict[str, str] = field(default_factory=dict)
    spare_template: dict[str, Any] | None = None
    _final: dict[str, int] = field(default_factory=dict)  # slot -> exit code, once known
    _exits: dict[str, tuple[float, list[WorkerExit]]] = field(
        default_factory=dict
    )  # slot -> (finished, exits)
    _coordinator_ip: str | None = None

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "namespace": self.namespace,
            "job_name": self.job_name,
            "attempt": self.attempt,
            "nodes": list(self.names),
            "procs_per_node": self.procs_per_node,
            "launched_at": self.launched_at,
            "kinds": list(self.kinds),
            "pod_uids": dict(self.pod_uids),
        }
        if self.spare_template is not None:
            record |= {
                "spares": list(self.spares),
                "spare_count": self.spare_count,
                "replaced": dict(self.replaced),
                "spare_template": self.spare_template,
            }
            if self._coordinator_ip is not None:
                record["coordinator_url"] = self.coordinator_url
        return record

    @property
    def selector(self) -> str:
        return render.attempt_selector(self.job_name, self.attempt)

    def slot_of(self, pod_name: str) -> str:
        """`n<index>` or `s<k>` from the pod's name (`<job>-a<attempt>-<slot>`)."""
        return pod_name.removeprefix(f"{self.job_name}-a{self.attempt}-")

    def _pods(self) -> dict[str, dict[str, Any]]:
        """The attempt's node and spare pods by slot."""
        return {
            self.slot_of(pod["metadata"]["name"]): pod
            for pod in self.kube.list("Pod", self.namespace, self.selector)
            if (pod["metadata"].get("labels") or {}).get(render.LABEL_ROLE) != "coordinator"
        }

    def poll(self) -> dict[str, int | None]:
        pods = self._pods()
        now = self.clock()
        codes: dict[str, int | None] = {}
        for index, slot in enumerate(self.names):
            if slot in self._final:
                codes[slot] = self._final[slot]
                continue
            pod = pods.get(slot)
            if pod is not None and slot not in self.pod_uids:
                self.pod_uids[slot] = pod["metadata"]["uid"]  # attached by labels: adopt what is there
            code = self._exit_code(slot, pod, now)
            if code is not None:
                self._final[slot] = code
                if code not in (0, EXIT_LOST) and pod is not None:
                    self._read_exits(slot, index, pod, code)
            codes[slot] = code
        return codes

    # ----------------------------------------------------------------------------------- in-place recovery

    @property
    def can_start_spares(self) -> bool:
        return self.spare_template is not None

    @property
    def coordinator_url(self) -> str | None:
        """The coordinator's API at its pod's IP (the operator runs in the cluster), once the pod runs; None on
        the restart path or before."""
        if self.spare_template is None:
            return None
        if self._coordinator_ip is None:
            name = render.coordinator_name(self.job_name, self.attempt)
            try:
                pod = self.kube.read("Pod", self.namespace, name)
            except ApiException as err:
                log.warning("job %s: reading the coordinator's pod: %s", self.job_name, api_error(err))
                return None
            ip = (pod.get("status") or {}).get("podIP")
            if not ip or (pod.get("status") or {}).get("phase") != "Running":
                return None
            self._coordinator_ip = f"[{ip}]" if ":" in ip else ip
        return f"http://{self._coordinator_ip}:{render.COORDINATOR_HTTP_PORT}"

    def coordinator_exit(self) -> int | None:
        """The coordinator pod's exit code once it ended or went (EXIT_LOST), None while it runs or starts."""
        if self.spare_template is None:
            return None
        name = render.coordinator_name(self.job_name, self.attempt)
        try:
            pod = self.kube.read("Pod", self.namespace, name)
        except ApiException as err:
            return EXIT_LOST if err.status == 404 else None
        if pod["metadata"].get("deletionTimestamp"):
            return EXIT_LOST
        phase = (pod.get("status") or {}).get("phase")
        if phase not in ("Failed", "Succeeded", "Unknown"):
            return None
        return int((_terminated(pod) or {}).get("exitCode") or EXIT_LOST)

    def live_spares(self) -> list[str]:
        pods = self._pods()
        now = self.clock()
        return [slot for slot in self.spares if self._exit_code(slot, pods.get(slot), now) is None]

    def lost_spares(self) -> list[tuple[str, int]]:
        """Spare pods that ended while waiting (failed, deleted, evicted), with their exit codes: no longer
        spares."""
        pods = self._pods()
        now = self.clock()
        lost = []
        for slot in list(self.spares):
            if (code := self._exit_code(slot, pods.get(slot), now)) is not None:
                self.spares.remove(slot)
                lost.append((slot, code))
        return lost

    def start_spare(self) -> str | None:
        """Create one more spare pod (`s<k>`), from the attempt's template; its slot, None on the restart path."""
        if self.spare_template is None:
            return None
        slot = f"{render.SPARE_PREFIX}{self.spare_count}"
        pod = copy.deepcopy(self.spare_template)
        name = render.slot_pod_name(self.job_name, self.attempt, slot)
        pod["metadata"]["name"] = pod["spec"]["hostname"] = name
        for var in pod["spec"]["containers"][0]["env"]:
            if var["name"] == ENV_RECOVERY_MEMBER:
                var["value"] = slot
        self.spare_count += 1  # a create that failed leaves its number unused: names are never reused
        created = self.kube.create(pod)
        self.pod_uids[slot] = created["metadata"]["uid"]
        self.spares.append(slot)
        log.info("job %s attempt %d: spare pod %s created", self.job_name, self.attempt, name)
        return slot

    def promote(self, spare: str, *, replacing: str) -> None:
        """The spare pod took the lost slot's ranks and stands in its place; the lost pod is left as it ended
        (its log stays readable) and goes with the attempt. No other pod is touched."""
        index = self.names.index(replacing)
        self.spares.remove(spare)
        self.names[index] = spare
        self.replaced[replacing] = spare
        self._exits.pop(replacing, None)  # recovered from: never the root cause of a later failure

    def kill_ranks(self, ranks: Sequence[int], pids: Mapping[int, int] | None = None) -> list[int]:
        """A hung node's ranks: its pod is deleted at once (grace 0: SIGKILL, which ends a stopped process
        too). Processes live in pods: no pids to return."""
        for slot in sorted({self.names[r // self.procs_per_node] for r in ranks}):
            name = render.slot_pod_name(self.job_name, self.attempt, slot)
            self.kube.delete("Pod", self.namespace, name, grace_seconds=0)
            log.warning("job %s attempt %d: hung pod %s deleted", self.job_name, self.attempt, name)
        return []

    def stopped_ranks(self, pids: Mapping[int, int] | None = None) -> set[int]:
        return set()  # a process's state is out of the operator's sight

    def node_end_time(self, name: str) -> float | None:
        """When the slot's pod's container ended (its own clock), None while it runs."""
        pod = self._pods().get(name)
        ended = parse_time((_terminated(pod) or {}).get("finishedAt")) if pod is not None else None
        return _clamp(ended.timestamp(), self.launched_at, self.clock()) if ended is not None else None

    def stop_spares(self) -> None:
        """The attempt ended: its spare pods and the coordinator go now (the nodes' pods stay for their logs)."""
        names = [render.slot_pod_name(self.job_name, self.attempt, s) for s in self.spares]
        names.append(render.coordinator_name(self.job_name, self.attempt))
        for name in names:
            self.kube.delete("Pod", self.namespace, name, grace_seconds=0)
        self.spares.clear()

    def _exit_code(self, slot: str, pod: dict[str, Any] | None, now: float) -> int | None:
        if pod is None or pod["metadata"]["uid"] != self.pod_uids.get(slot):
            log.warning("job %s attempt %d: the pod of %s is gone", self.job_name, self.attempt, slot)
            return EXIT_LOST
        status = pod.get("status") or {}
        phase = status.get("phase")
        terminated = _terminated(pod)
        if phase == "Succeeded":
            return 0
        if phase == "Failed":
            if terminated is not None and status.get("reason") not in _LOST_REASONS:
                code = int(terminated.get("exitCode") or 0)
                signal_number = terminated.get("signal")
                return -int(signal_number) if signal_number else (code or EXIT_LOST)
            return EXIT_LOST
        if pod["metadata"].get("deletionTimestamp") or phase == "Unknown":
            return EXIT_LOST  # drained, evicted or its node stopped reporting: the gang is broken either way
        timeout = self.scheduling_timeout_seconds
        # A spare created after the launch (a replacement) has its own time to be scheduled.
        created = parse_time(pod["metadata"].get("creationTimestamp"))
        since = max(self.launched_at, created.timestamp()) if created is not None else self.launched_at
        if phase == "Pending" and timeout is not None and now - since > timeout:
            if not pod["spec"].get("nodeName"):
                log.warning(
                    "job %s attempt %d: %s not scheduled after %.0f s",
                    self.job_name,
                    self.attempt,
                    slot,
                    timeout,
                )
                return EXIT_LOST
            if _waiting_reason(pod) in _CANNOT_START:
                return 1
        return None

    def _read_exits(self, slot: str, index: int, pod: dict[str, Any], code: int) -> None:
        """The failed ranks of this pod, from torchrun's summary in its log (read now: the pod may go soon)."""
        container = pod["spec"]["containers"][0]["name"]
        try:
            exits = parse_failures(self.kube.pod_log(self.namespace, pod["metadata"]["name"], container))
        except ApiException as err:
            log.warning("job %s: cannot read the log of %s: %s", self.job_name, slot, api_error(err))
            exits = []
        now = self.clock()
        ended = parse_time((_terminated(pod) or {}).get("finishedAt"))
        finished = ended.timestamp() if ended else now
        # Times come from the pod's clock (torchrun's with 1 s resolution): keep them inside the attempt's span
        # on ours, so a failure never seems to precede its launch.
        finished = _clamp(finished, self.launched_at, now)
        exits = [replace(e, time=_clamp(e.time, self.launched_at, now)) for e in exits]
        exits = node_exits(
            exits,
            node=slot,
            code=code,
            first_rank=index * self.procs_per_node,
            procs_per_node=self.procs_per_node,
            finished=finished,
        )
        self._exits[slot] = (finished, exits)

    def worker_exits(self) -> list[WorkerExit]:
        """Failed ranks, the root cause first: torchrun's own root cause in the pod that failed first (or that
        pod's first rank, when its log had no summary)."""
        return root_causes(self._exits.values())

    def pids(self) -> dict[str, list[int]]:
        return {name: [] for name in self.names}  # processes live in the pods, out of the operator's sight

    def rank_pids(self) -> dict[int, int]:
        return {}

    def dump_stacks(
        self, texts: dict[int, str] | None = None, pids: Mapping[int, int] | None = None
    ) -> dict[int, str]:
        return {}  # needs pods/exec, which the operator's role does not grant

    def cancel(self, grace_seconds: float) -> None:
        try:
            self.poll()  # keep the codes and logs of pods that already ended
        except ApiException as err:
            log.warning(
                "job %s attempt %d: poll before cancel: %s", self.job_name, self.attempt, api_error(err)
            )
        for slot in self.names:
            self._final.setdefault(slot, STOPPED_BY_US)
        grace = max(0, math.ceil(grace_seconds))
        selector = self.selector
        for kind in reversed(self.kinds):
            for obj in self.kube.list(kind, self.namespace, selector):
                self.kube.delete(
                    kind,
                    self.namespace,
                    obj["metadata"]["name"],
                    grace_seconds=grace if kind == "Pod" else None,
                )
        deadline = self.clock() + grace + 5.0
        while self.kube.list("Pod", self.namespace, selector) and self.clock() < deadline:
            time.sleep(self.cancel_poll_seconds)

    def detach(self) -> None:
        pass  # nothing of the gang lives in this process


def _clamp(t: float | None, low: float, high: float) -> float | None:
    return None if t is None else min(max(t, low), high)


def _terminated(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated is not None:
            return terminated
    return None


def _waiting_reason(pod: Mapping[str, Any]) -> str | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting")
        if waiting is not None:
            return waiting.get("reason")
    return None


# ------------------------------------------------------------------------------------------------ telemetry


class PodEndpointTelemetry:
    """`EndpointTelemetry` over the attempt's pods: each poll lists them and publishes, for every rank of a running
    pod with an IP, the endpoint file the ingest reads (`url` = http://<pod IP>:<base_port + local rank>/metrics),
    then scrapes. Files of ranks whose pod stopped running are removed, so a stale IP is never scraped."""

    def __init__(
        self,
        kube: KubeApi,
        *,
        namespace: str,
        job_name: str,
        attempt: int,
        num_ranks: int,
        rank_nodes: Sequence[str],
        base_port: int,
        folder: Path,
    ):
        """`rank_nodes`: each rank's slot (`n<index>`, or the spare that took a lost slot's ranks)."""
        self.kube = kube
        self.namespace = namespace
        self.job_name = job_name
        self.rank_nodes = list(rank_nodes)
        self.base_port = base_port
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._inner = EndpointTelemetry(self.folder, num_ranks, attempt)
        self._published: dict[int, str] = {}

    @property
    def attempt(self) -> int:
        return self._inner.attempt

    def poll(self, now: float) -> TelemetryUpdate:
        try:
            self._publish()
        except ApiException as err:  # the endpoints published last stay; the scrape says what it can reach
            log.warning("job %s: listing pods for telemetry: %s", self.job_name, api_error(err))
        return self._inner.poll(now)

    def _publish(self) -> None:
        pods = self.kube.list("Pod", self.namespace, render.attempt_selector(self.job_name, self.attempt))
        urls: dict[int, str] = {}
        for pod in pods:
            status = pod.get("status") or {}
            ip = status.get("podIP")
            if status.get("phase") != "Running" or not ip or pod["metadata"].get("deletionTimestamp"):
                continue
            slot = pod["metadata"]["name"].removeprefix(f"{self.job_name}-a{self.attempt}-")
            host = f"[{ip}]" if ":" in ip else ip
            ranks = [r for r, node in enumerate(self.rank_nodes) if node == slot][: self._inner.num_ranks]
            for local_rank, rank in enumerate(ranks):
                urls[rank] = f"http://{host}:{self.base_port + local_rank}/metrics"
        for rank in set(self._published) - set(urls):
            (self.folder / ENDPOINT_FILE.format(rank=rank)).unlink(missing_ok=True)
            del self._published[rank]
        for rank, url in urls.items():
            if self._published.get(rank) == url:
                continue
            path = self.folder / ENDPOINT_FILE.format(rank=rank)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "attempt": self.attempt}))
            tmp.replace(path)
            self._published[rank] = url

    def reassign(self, rank_nodes: Sequence[str]) -> None:
        """In-place recovery gave a lost slot's ranks to a spare pod: their endpoints are the spare's now."""
        self.rank_nodes = list(rank_nodes)

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        self._inner.start_attempt(attempt, launched_at=launched_at)
        self._published.clear()

    def close(self) -> None:
        self._inner.close()
        shutil.rmtree(self.folder, ignore_errors=True)
