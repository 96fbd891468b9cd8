"""The operator: TrainingJobs in the cluster, run by the controller core through the Kubernetes backend.

One pass (the leader's, every `poll_seconds` or sooner when a TrainingJob changes):

    each TrainingJob  -> finalizer on; admitted into the store once (spec validated; an invalid one gets the
                         Failed condition with its one-line reason and nothing is launched); deleted ones are
                         cancelled, every object of theirs deleted, the finalizer removed
    the store         -> jobs bound to a TrainingJob that no longer exists are cancelled and forgotten
    the controller    -> `reconcile_once()`: launches, supervision, restarts (controller.reconciler)
    each TrainingJob  -> status written back when it changed; the job's new events become Kubernetes Events;
                         with --cordon-excluded-nodes, nodes excluded as stragglers are cordoned

Decisions:

- The official client directly, not kopf. The controller core already is the reconcile loop (level-triggered,
  idempotent, crash-safe through its store) and kopf would add a second one with its own state in annotations,
  its own retries and its own leader handling (kopf's peering is a "freeze" protocol over its own CRD, not a
  Lease). What we need from Kubernetes is small: one list+watch of TrainingJobs, CRUD of an attempt's objects,
  a status write with optimistic concurrency, and a Lease. The client is already a dependency; kopf is not.
- State: the controller's store (VLCTL_DATABASE_URL) holds each job's history; the cluster's TrainingJob objects
  say what exists. A store job is bound to its object (namespace, uid, generation) by an event written when it
  is admitted. A store job whose object is gone (or was replaced by one of the same name, or whose store is
  behind the object's status: a replica with its own SQLite file after a failover) is cancelled and forgotten;
  the object is admitted again and its attempts continue after the number in its status. With one shared
  database (PostgreSQL) a new leader re-attaches to the running pods; with a file per replica it relaunches
  from the newest checkpoint.
- Names: a store job is named like its TrainingJob, so names are unique across namespaces; a second
  TrainingJob of a name another namespace uses gets the Failed condition.
- Leader election with a coordination.k8s.io Lease, as client-go does it: a candidate takes the Lease when its
  holder has not renewed it for the lease duration, measured on the candidate's own clock from when it last saw
  the record change (no clock comparison across machines); the leader stops acting once it has not renewed for
  the renew deadline (shorter than the duration, so it stops before anyone can take over). The Lease is
  renewed in its own thread, and every write the operator and the backend make goes through an API client
  that refuses writes while this replica is not the leader (`NotLeader`, a BaseException so that no
  `except Exception` in the controller core swallows it): losing the lease stops all acting at the next
  request, even in the middle of a pass. The controller's claims in the store are a second fence.
- Status is written with `replace` on the status subresource, carrying the resourceVersion read: a 409 means
  someone wrote in between, so the object is read again and the status recomputed. Conditions are keyed by
  type, each with a CamelCase reason, message and lastTransitionTime (kept while the condition's status does
  not change); `observedGeneration` is the generation admitted: spec changes after admission are not applied.
  Progress and ETTR alone change every step: they are written at most every `status_interval_seconds`.
- The watch restarts from the last resourceVersion seen; 410 Gone (the history moved on) means list again.
- The job's timeline goes out as core/v1 Events on the object, named after the event's number, so a replica
  that sends one again gets AlreadyExists instead of a duplicate.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select

from controller.backends.kubernetes import (
    GangMode,
    JobBinding,
    KubernetesBackend,
    MetricsSource,
    api_error,
    call_json,
)
from controller.domain import states
from controller.domain.phases import ACTIVE_PHASES, EventType, Phase
from controller.reconciler import Controller, ControllerConfig
from controller.spec import SpecError, TrainingJobSpec
from controller.store.models import Checkpoint, Event, Job, RankStatus
from controller.store.records import excluded_nodes
from controller.store.repo import JobExists, append_event, create_job
from controller.store.session import Store
from k8s import render
from k8s.crd import (
    API_VERSION,
    CONDITION_CREATED,
    CONDITION_FAILED,
    CONDITION_RESTARTING,
    CONDITION_RUNNING,
    CONDITION_STRAGGLER_DETECTED,
    CONDITION_SUCCEEDED,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    env_secrets,
    spec_from_object,
    status_phase,
)

log = logging.getLogger(__name__)

FINALIZER = f"{GROUP}/cleanup"
LEASE_NAME = "vlctl-operator"
COMPONENT = "vlctl-operator"
REASON_BOUND = (
    "TrainingJobBound"  # store event: the job belongs to this object (data: namespace, uid, generation)
)
REASON_ADMITTED = "Admitted"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_NAME_TAKEN = "NameTaken"
REASON_NO_STRAGGLERS = "NoStragglers"
REASON_STRAGGLERS = "StragglerFlagged"
MIRRORED_EVENTS_ON_START = (
    20  # a replica new to a job re-sends its last events (duplicates are refused by name)
)
WARNING_EVENT_TYPES = frozenset({EventType.FAILURE, EventType.STRAGGLER, EventType.NODE_HEALTH})


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso(d: datetime | None) -> str | None:
    return None if d is None else d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------------ manifests


class RenderedAttempts:
    """`AttemptManifests` for the backend: `k8s.render`, with the controller's configuration in the ConfigMap."""

    label_job = render.LABEL_JOB
    label_attempt = render.LABEL_ATTEMPT
    label_node_index = render.LABEL_NODE_INDEX

    def render(
        self,
        binding: JobBinding,
        *,
        attempt: int,
        config: Mapping[str, Any],
        excluded_nodes: Sequence[str],
        image: str,
        gang: GangMode,
        queue: str | None,
    ) -> list[dict[str, Any]]:
        objects = render.render_job(
            binding.spec,
            namespace=binding.namespace,
            attempt=attempt,
            resume_from=resume_point(config),
            excluded_nodes=excluded_nodes,
            image=image,
            owner=binding.owner,
            gang=gang,
            queue=queue,
            env_secrets=binding.env_secrets,
        )
        text = yaml.safe_dump(pod_config(config, binding.spec), sort_keys=False)
        objects[0]["data"][render.CONFIG_FILE] = text
        return objects

    def metrics_base_port(self, spec: TrainingJobSpec) -> int:
        return render.metrics_base_port(spec)


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


def owner_of(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"]}


# ------------------------------------------------------------------------------------------------ leadership


class NotLeader(BaseException):
    """A write while this replica does not hold the Lease. A BaseException: it must cross the controller core's
    per-job `except Exception` handlers, so a replica that lost the lease stops acting at once."""


class LeaderGuardedApiClient(client.ApiClient):
    """Refuses every write (POST, PUT, PATCH, DELETE) unless `may_write()`; reads always pass."""

    def __init__(self, configuration: client.Configuration, may_write: Callable[[], bool]):
        super().__init__(configuration)
        self.may_write = may_write

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if method in ("POST", "PUT", "PATCH", "DELETE") and not self.may_write():
            raise NotLeader(f"{method} {url}: this replica is not the leader")
        return super().request(method, url, *args, **kwargs)


def _micro_time(d: datetime) -> str:
    return d.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Holds a coordination.k8s.io/v1 Lease while it can; `is_leader()` is what every write checks."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        lease_seconds: float = 15.0,
        renew_deadline_seconds: float = 10.0,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 < retry_seconds < renew_deadline_seconds < lease_seconds:
            raise ValueError(
                "leader election: need 0 < retry_seconds < renew_deadline_seconds < lease_seconds, got "
                f"{retry_seconds}, {renew_deadline_seconds}, {lease_seconds}"
            )
        if not identity:
            raise ValueError("identity: the leader-election identity must not be empty")
        self.api = client.CoordinationV1Api(api_client)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.renew_deadline_seconds = renew_deadline_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._renewed_at: float | None = None  # our clock, at our last successful acquire or renew
        self._observed: tuple[Any, ...] | None = None  # (holder, renewTime, transitions) last seen
        self._observed_at = 0.0
        self._lock = threading.Lock()

    def is_leader(self) -> bool:
        with self._lock:
            renewed = self._renewed_at
        return renewed is not None and self.clock() - renewed < self.renew_deadline_seconds

    def _set_leader(self, renewed_at: float | None, *, quiet: bool = False) -> None:
        with self._lock:
            was = self._renewed_at is not None
            self._renewed_at = renewed_at
        if renewed_at is None and was and not quiet:
            log.warning("%s lost the lease %s/%s", self.identity, self.namespace, self.name)

    def try_acquire_or_renew(self) -> bool:
        now, t = datetime.now(UTC), self.clock()
        try:
            lease = call_json(self.api.read_namespaced_lease, self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            return self._create(now, t)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, t
        duration = float(spec.get("leaseDurationSeconds") or self.lease_seconds)
        if holder and holder != self.identity and t - self._observed_at < duration:
            self._set_leader(None)
            return False
        taking_over = holder != self.identity
        lease["spec"] = {
            **spec,
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(round(self.lease_seconds)),
            "renewTime": _micro_time(now),
            "acquireTime": _micro_time(now) if taking_over else spec.get("acquireTime", _micro_time(now)),
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (1 if taking_over and holder else 0),
        }
        try:
            lease = call_json(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        except ApiException as err:
            if err.status == 409:  # another candidate wrote first
                self._set_leader(None)
                return False
            raise
        spec = lease["spec"]
        self._observed = (spec["holderIdentity"], spec.get("renewTime"), spec.get("leaseTransitions"))
        self._observed_at = t
        if taking_over:
            log.info("%s took the lease %s/%s", self.identity, self.namespace, self.name)
        self._set_leader(t)
        return True

    def _create(self, now: datetime, t: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(round(self.lease_seconds)),
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": 0,
            },
        }
        try:
            call_json(self.api.create_namespaced_lease, self.namespace, body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        log.info("%s created the lease %s/%s", self.identity, self.namespace, self.name)
        self._set_leader(t)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception as err:  # an unreachable API server: the renew deadline ends leadership
                log.warning("leader election: %s", api_error(err) if isinstance(err, ApiException) else err)
            stop.wait(self.retry_seconds)

    def release(self) -> None:
        """Hand the lease over at once (holder emptied) when leaving as the leader."""
        if not self.is_leader():
            return
        self._set_leader(None, quiet=True)
        try:
            lease = call_json(self.api.read_namespaced_lease, self.name, self.namespace)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(datetime.now(UTC)),
            }
            call_json(self.api.replace_namespaced_lease, self.name, self.namespace, lease)
        except ApiException as err:
            log.warning("releasing the lease: %s", api_error(err))


# ------------------------------------------------------------------------------------------------ the watch


class TrainingJobCache:
    """Every TrainingJob in scope, kept current by list + watch in a thread; `changed` is set on every event."""

    def __init__(
        self, api_client: client.ApiClient, namespace: str | None, *, watch_seconds: int = 300
    ) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.watch_seconds = watch_seconds
        self.changed = threading.Event()
        self.synced = threading.Event()
        self.relists = 0
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trainingjob-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(obj) for _, obj in sorted(self._objects.items())]

    def put(self, obj: Mapping[str, Any]) -> None:
        """Our own write's answer: newer than what the cache holds unless the watch already brought more."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            held = self._objects.get(key)
            if held is None or int(held["metadata"]["resourceVersion"]) < int(meta["resourceVersion"]):
                self._objects[key] = copy.deepcopy(dict(obj))

    def _list_call(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.namespace is None:
            return self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)
        return self.custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._list()
                self._follow(version)
            except ApiException as err:
                if err.status == 410:
                    log.info("TrainingJob watch expired (410 Gone): listing again")
                    continue
                log.warning("TrainingJob watch: %s", api_error(err))
            except Exception as err:  # a dropped connection, or stop() closing the stream
                if self._stop.is_set():
                    return
                log.warning("TrainingJob watch: %s: %s", type(err).__name__, err)
            self._stop.wait(1.0)

    def _list(self) -> str:
        fn, args = self._list_call()
        answer = call_json(fn, *args)
        objects = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in answer.get("items") or []}
        with self._lock:
            self._objects = objects
        self.relists += 1
        self.synced.set()
        self.changed.set()
        return answer["metadata"]["resourceVersion"]

    def _follow(self, version: str) -> None:
        fn, args = self._list_call()
        while not self._stop.is_set():
            self._watch = watch.Watch()
            for event in self._watch.stream(
                fn, *args, resource_version=version, timeout_seconds=self.watch_seconds
            ):
                obj = event["object"]
                meta = obj["metadata"]
                key = (meta["namespace"], meta["name"])
                with self._lock:
                    if event["type"] == "DELETED":
                        self._objects.pop(key, None)
                    else:
                        self._objects[key] = obj
                version = meta["resourceVersion"]
                self.changed.set()


# ------------------------------------------------------------------------------------------------ status


def _condition(
    type_: str, status: bool, reason: str, message: str, previous: Mapping[str, Mapping[str, Any]], now: str
) -> dict[str, Any]:
    value = "True" if status else "False"
    before = previous.get(type_)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else None
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": since or now,
    }


def job_conditions(
    job: Job, *, flagged: Sequence[RankStatus], previous: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    """One condition per type: Created always; the others once they have been True (then kept, False)."""
    before = {c.get("type", ""): c for c in previous}
    phase, reason, message = job.phase, job.phase_reason, job.phase_message or ""
    straggling = ", ".join(f"rank {r.rank} on {r.node}" for r in flagged)
    wanted = [
        (CONDITION_CREATED, True, REASON_ADMITTED, f"admitted as job {job.name}"),
        (CONDITION_RUNNING, phase is Phase.RUNNING, reason, message),
        (CONDITION_RESTARTING, phase is Phase.RESTARTING, reason, message),
        (
            CONDITION_STRAGGLER_DETECTED,
            bool(flagged),
            REASON_STRAGGLERS if flagged else REASON_NO_STRAGGLERS,
            f"stragglers: {straggling}" if flagged else "no rank is flagged",
        ),
        (CONDITION_SUCCEEDED, phase is Phase.SUCCEEDED, reason, message),
        (CONDITION_FAILED, phase is Phase.FAILED, reason, message),
    ]
    return [
        _condition(type_, status, why, text, before, now)
        for type_, status, why, text in wanted
        if status or type_ == CONDITION_CREATED or type_ in before
    ]


def job_status(
    session: Any, job: Job, *, generation: int, previous: Mapping[str, Any] | None, now: str
) -> dict[str, Any]:
    """The TrainingJob's status from the store: what `kubectl get tj` and the printer columns show."""
    flagged = list(
        session.scalars(
            select(RankStatus)
            .where(RankStatus.job_id == job.id, RankStatus.flagged, RankStatus.attempt == job.current_attempt)
            .order_by(RankStatus.rank)
        )
    )
    status: dict[str, Any] = {
        "phase": status_phase(job.phase),
        "conditions": job_conditions(
            job, flagged=flagged, previous=(previous or {}).get("conditions") or [], now=now
        ),
        "attempt": job.current_attempt,
        "restarts": job.num_restarts,
        "restartsCounted": job.num_restarts_counted,
        "stragglers": [
            {
                "rank": r.rank,
                "node": r.node,
                **({"score": r.straggler_score} if r.straggler_score is not None else {}),
            }
            for r in flagged
        ],
        "excludedNodes": sorted(excluded_nodes(session=session, job_id=job.id)),
        "observedGeneration": generation,
    }
    if job.last_checkpoint_step is not None:
        row = session.scalars(
            select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == job.last_checkpoint_step)
        ).one_or_none()
        checkpoint: dict[str, Any] = {"step": job.last_checkpoint_step, "uri": job.last_checkpoint_uri or ""}
        if row is not None and (when := _iso(row.committed_at or row.created_at)):
            checkpoint["time"] = when
        status["lastCheckpoint"] = checkpoint
    if job.ettr is not None:
        status["ettr"] = round(min(1.0, max(0.0, job.ettr)), 4)
    progress: dict[str, Any] = {}
    if job.current_step is not None:
        progress["step"] = job.current_step
    if job.total_steps is not None:
        progress["totalSteps"] = job.total_steps
    if job.loss is not None:
        progress["loss"] = job.loss
    if job.tokens_per_second is not None:
        progress["tokensPerSecond"] = max(0.0, job.tokens_per_second)
    if progress:
        status["progress"] = progress
    return status


def rejected_status(
    reason: str, message: str, *, generation: int, previous: Mapping[str, Any] | None
) -> dict:
    before = {c.get("type", ""): c for c in (previous or {}).get("conditions") or []}
    return {
        "phase": status_phase(Phase.FAILED),
        "conditions": [_condition(CONDITION_FAILED, True, reason, message, before, utc_now())],
        "observedGeneration": generation,
    }


# ------------------------------------------------------------------------------------------------ the operator


@dataclass(kw_only=True)
class OperatorConfig:
    identity: str  # leader-election identity and the controller's id (the pod's name)
    image: str  # the trainer image
    lease_namespace: str = "vlctl-system"
    lease_name: str = LEASE_NAME
    watch_namespace: str | None = None  # None: TrainingJobs in every namespace
    gang: GangMode = "none"
    queue: str | None = None
    scheduling_timeout_seconds: float | None = 300.0
    metrics: MetricsSource = "endpoints"
    prometheus_url: str | None = None
    poll_seconds: float = 1.0
    lease_seconds: float = 15.0
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0
    watch_seconds: int = 300
    status_interval_seconds: float = 10.0  # progress and ETTR alone are written at most this often
    cordon_excluded_nodes: bool = False  # needs optional/node-cordon.yaml
    controller: ControllerConfig = field(default_factory=ControllerConfig)

    def __post_init__(self) -> None:
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds: must be > 0, got {self.poll_seconds}")
        if self.watch_seconds < 1:
            raise ValueError(f"watch_seconds: must be >= 1, got {self.watch_seconds}")
        self.controller.controller_id = self.identity
        self.controller.poll_seconds = self.poll_seconds


@dataclass
class _Bound:
    """A store job's tie to its TrainingJob (from the store's TrainingJobBound event)."""

    job_id: int
    namespace: str
    uid: str
    generation: int


class Operator:
    def __init__(
        self,
        store: Store,
        configuration: client.Configuration,
        config: OperatorConfig,
    ):
        self.store = store
        self.config = config
        self.elector = LeaderElector(
            client.ApiClient(configuration),
            namespace=config.lease_namespace,
            identity=config.identity,
            name=config.lease_name,
            lease_seconds=config.lease_seconds,
            renew_deadline_seconds=config.renew_deadline_seconds,
            retry_seconds=config.retry_seconds,
        )
        self.api_client = LeaderGuardedApiClient(configuration, self.elector.is_leader)
        self.api_client.user_agent = f"{COMPONENT}/{config.identity}"
        self.elector.api.api_client.user_agent = f"{COMPONENT}/{config.identity}"
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.cache = TrainingJobCache(
            client.ApiClient(configuration), config.watch_namespace, watch_seconds=config.watch_seconds
        )
        self.cache.custom.api_client.user_agent = f"{COMPONENT}/{config.identity}"
        self.backend = KubernetesBackend(
            self.api_client,
            config.image,
            manifests=RenderedAttempts(),
            resolve=self._binding,
            gang=config.gang,
            queue=config.queue,
            scheduling_timeout_seconds=config.scheduling_timeout_seconds,
            metrics=config.metrics,
            prometheus_url=config.prometheus_url,
        )
        self.controller = Controller(store, backends={"kubernetes": self.backend}, config=config.controller)
        self.leading = False
        self.heartbeat = time.monotonic()  # /healthz: the loop is alive
        self._bindings: dict[str, JobBinding] = {}
        self._mirrored: dict[int, int] = {}  # store job id -> newest event seq sent as a Kubernetes Event
        self._cordoned: set[str] = set()
        self._warned_generation: set[tuple[str, int]] = set()
        self._status_written: dict[tuple[str, str], float] = {}

    # ---------------------------------------------------------------------------- the loop

    def run(self, stop: threading.Event) -> None:
        """Elect, watch and reconcile until `stop` is set; then detach, release the claims and the lease."""
        elector_stop = threading.Event()
        elector = threading.Thread(target=self.elector.run, args=(elector_stop,), name="leader-election")
        elector.start()
        self.cache.start()
        try:
            while not stop.is_set():
                self.heartbeat = time.monotonic()
                if not self.elector.is_leader():
                    if self.leading:
                        self._stand_down()
                    stop.wait(min(self.config.retry_seconds, self.config.poll_seconds))
                    continue
                if not self.leading:
                    self._take_charge()
                try:
                    self.cache.changed.clear()
                    self.act_once()
                except NotLeader:
                    log.warning("%s: lost the lease during a pass; standing down", self.config.identity)
                    self._stand_down()
                except Exception:
                    log.exception("operator pass failed; trying again on the next one")
                self.cache.changed.wait(self.config.poll_seconds)
        finally:
            if self.leading:
                self._stand_down()
            elector_stop.set()
            elector.join(timeout=10)
            self.elector.release()
            self.cache.stop()

    def _take_charge(self) -> None:
        log.info("%s is the leader: reconciling TrainingJobs", self.config.identity)
        self.leading = True
        self._mirrored.clear()
        self._cordoned.clear()

    def _stand_down(self) -> None:
        """Stop acting: leave the gangs to the next leader (they keep running) and give up the store claims."""
        self.leading = False
        try:
            self.controller.shutdown()
        except Exception:
            log.exception("releasing the controller's claims")

    def act_once(self) -> None:
        if not self.cache.synced.is_set():
            return
        objects = self.cache.snapshot()
        with self.store.read() as session:
            bound = self._bound(session)
        for obj in objects:
            try:
                self._sync(obj, bound)
            except (ApiException, ValueError, RuntimeError) as err:
                detail = api_error(err) if isinstance(err, ApiException) else str(err)
                log.warning("TrainingJob %s: %s", _key(obj), detail)
        self._forget_orphans(objects)
        self.controller.reconcile_once()
        with self.store.read() as session:
            bound = self._bound(session)
        for obj in objects:
            b = bound.get(obj["metadata"]["name"])
            if obj["metadata"].get("deletionTimestamp") or b is None or b.uid != obj["metadata"]["uid"]:
                continue
            try:
                self._publish(obj, b)
            except ApiException as err:
                log.warning("TrainingJob %s: %s", _key(obj), api_error(err))

    # ---------------------------------------------------------------------------- admission

    def _binding(self, job_name: str) -> JobBinding:
        return self._bindings[job_name]

    def _bound(self, session: Any) -> dict[str, _Bound]:
        """Store job name -> its binding, for every job bound to a TrainingJob (the newest binding wins)."""
        rows = session.execute(
            select(Job.name, Job.id, Event.data)
            .join(Event, Event.job_id == Job.id)
            .where(Event.reason == REASON_BOUND)
            .order_by(Event.seq)
        )
        return {
            name: _Bound(job_id, data["namespace"], data["uid"], int(data.get("generation") or 1))
            for name, job_id, data in rows
        }

    def _sync(self, obj: dict[str, Any], bindings: Mapping[str, _Bound]) -> None:
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        bound = bindings.get(name)
        if meta.get("deletionTimestamp"):
            self._finalize(obj, bound)
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            self._patch_finalizers(obj, [*(meta.get("finalizers") or []), FINALIZER])
            return  # the next pass sees the object with it
        with self.store.read() as session:
            job = session.scalars(select(Job).where(Job.name == name)).one_or_none()
            job_attempt = job.current_attempt if job is not None else 0
        status_attempt = int((obj.get("status") or {}).get("attempt") or 0)
        if job is not None and bound is not None and (bound.namespace, bound.uid) != (namespace, meta["uid"]):
            owner = next((o for o in self.cache.snapshot() if _is(o, bound.namespace, bound.uid)), None)
            unseen = self.config.watch_namespace not in (
                None,
                bound.namespace,
            )  # cannot tell if it still exists
            if owner is not None or unseen:
                self._reject(
                    obj, REASON_NAME_TAKEN, f"the TrainingJob {bound.namespace}/{name} has this name"
                )
                return
            self._forget(name, "its TrainingJob was replaced by another of the same name")
            job = None
        elif job is not None and bound is None:
            self._reject(
                obj, REASON_NAME_TAKEN, f"a job named {name} was submitted to the store outside Kubernetes"
            )
            return
        elif job is not None and status_attempt > job_attempt:
            self._forget(name, f"the store is behind the cluster (attempt {job_attempt} < {status_attempt})")
            job = None
        if job is None:
            self._admit(obj, status_attempt)
            return
        assert bound is not None
        with self.store.read() as session:
            spec = TrainingJobSpec.model_validate(session.get(Job, bound.job_id).spec)
        self._bindings[name] = JobBinding(
            namespace=namespace, spec=spec, owner=owner_of(obj), env_secrets=env_secrets(obj)
        )
        generation = int(meta.get("generation") or 1)
        if generation != bound.generation and (name, generation) not in self._warned_generation:
            self._warned_generation.add((name, generation))
            log.warning(
                "TrainingJob %s: spec changes after admission (generation %d, admitted %d) are not applied",
                _key(obj),
                generation,
                bound.generation,
            )

    def _validate(self, obj: Mapping[str, Any]) -> TrainingJobSpec:
        """The spec as the controller will run it; SpecError or ValueError with the one-line reason."""
        spec = spec_from_object(obj)
        if "backend" in spec.model_fields_set and spec.backend != "kubernetes":
            raise ValueError(
                f"TrainingJob {_key(obj)}: backend: a TrainingJob runs on the kubernetes backend, got {spec.backend!r}"
            )
        spec.backend = "kubernetes"
        meta = obj["metadata"]
        try:  # what Kubernetes or the trainer would reject, before anything is created
            render.render_job(
                spec,
                namespace=meta["namespace"],
                attempt=1,
                resume_from=None,
                excluded_nodes=(),
                image=self.config.image,
                owner=owner_of(obj),
                gang=self.config.gang,
                queue=self.config.queue,
                env_secrets=env_secrets(obj),
            )
        except ValueError as err:
            raise ValueError(f"TrainingJob {_key(obj)}: {err}") from None
        return spec

    def _admit(self, obj: dict[str, Any], continue_after: int) -> None:
        meta = obj["metadata"]
        try:
            spec = self._validate(obj)
        except (SpecError, ValueError) as err:
            self._reject(obj, REASON_INVALID_SPEC, str(err))
            return
        generation = int(meta.get("generation") or 1)
        with self.store.transaction() as session:
            try:
                job = create_job(session=session, name=spec.name, spec=spec.model_dump(mode="json"))
            except JobExists:
                return  # admitted by someone else in between: the next pass binds it
            if continue_after:
                # The object's pods were numbered by another store (a lost file, another replica's): continue
                # after them, so no new object takes a name an older one may still hold while terminating.
                job.current_attempt = continue_after
            append_event(
                session=session,
                job=job,
                type=EventType.CONTROLLER,
                reason=REASON_BOUND,
                message=f"bound to TrainingJob {_key(obj)} (generation {generation})",
                data={"namespace": meta["namespace"], "uid": meta["uid"], "generation": generation},
            )
        self._bindings[spec.name] = JobBinding(
            namespace=meta["namespace"], spec=spec, owner=owner_of(obj), env_secrets=env_secrets(obj)
        )
        log.info("TrainingJob %s admitted", _key(obj))

    def _reject(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self._bindings.pop(obj["metadata"]["name"], None)
        generation = int(obj["metadata"].get("generation") or 1)
        self._write_status(
            obj,
            lambda fresh: rejected_status(
                reason, message, generation=generation, previous=fresh.get("status")
            ),
        )

    def _forget(self, name: str, why: str) -> None:
        """Cancel a store job whose TrainingJob is gone (or another now) and delete its history."""
        with self.store.transaction() as session:
            job = session.scalars(select(Job).where(Job.name == name)).one_or_none()
            if job is None:
                return
            if job.phase in ACTIVE_PHASES:
                states.cancel(job, session=session, message=f"cancelled: {why}")
            self._mirrored.pop(job.id, None)
            session.delete(job)
        self._bindings.pop(name, None)
        log.info("job %s forgotten: %s", name, why)

    def _forget_orphans(self, objects: Sequence[Mapping[str, Any]]) -> None:
        present = {(o["metadata"]["namespace"], o["metadata"]["name"], o["metadata"]["uid"]) for o in objects}
        with self.store.read() as session:
            bound = self._bound(session)
        scope = self.config.watch_namespace
        for name, b in bound.items():
            if scope not in (None, b.namespace) or (b.namespace, name, b.uid) in present:
                continue
            if any(o["metadata"]["name"] == name for o in objects):
                continue  # replaced by a new object of that name: `_sync` handles it
            try:
                self.backend.remove_job(name, b.namespace)  # owner references would too, eventually
            except ApiException as err:
                log.warning("job %s: deleting the objects of a gone TrainingJob: %s", name, api_error(err))
                continue
            self._forget(name, f"its TrainingJob {b.namespace}/{name} no longer exists")

    # ---------------------------------------------------------------------------- deletion

    def _finalize(self, obj: dict[str, Any], bound: _Bound | None) -> None:
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        ours = bound is not None and (bound.namespace, bound.uid) == (namespace, meta["uid"])
        if ours:
            assert bound is not None
            with self.store.transaction() as session:
                job = session.get(Job, bound.job_id)
                if job is not None and job.phase in ACTIVE_PHASES:
                    states.cancel(job, session=session, message=f"TrainingJob {_key(obj)} deleted")
        left = self.backend.remove_job(name, namespace)
        if left:
            log.info(
                "TrainingJob %s: waiting for %d object(s) to go before removing the finalizer",
                _key(obj),
                left,
            )
            return
        if ours:
            self._forget(name, "its TrainingJob was deleted")
        if FINALIZER in (meta.get("finalizers") or []):
            self._patch_finalizers(obj, [f for f in meta["finalizers"] if f != FINALIZER])

    def _patch_finalizers(self, obj: dict[str, Any], finalizers: list[str]) -> None:
        meta = obj["metadata"]
        patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
        try:  # the resourceVersion makes it conditional: another client's finalizer is never lost
            answer = call_json(
                self.custom.patch_namespaced_custom_object, GROUP, VERSION, meta["namespace"], PLURAL,
                meta["name"], patch, _content_type="application/merge-patch+json",
            )  # fmt: skip
        except ApiException as err:
            if err.status in (404, 409):  # gone, or changed: the watch brings the new version
                return
            raise
        if answer and answer.get("metadata", {}).get("name"):
            self.cache.put(answer)

    # ---------------------------------------------------------------------------- status, events, nodes

    def _publish(self, obj: dict[str, Any], bound: _Bound) -> None:
        job_id = bound.job_id

        def compute(fresh: Mapping[str, Any]) -> dict[str, Any]:
            with self.store.read() as session:
                job = session.get(Job, job_id)
                assert job is not None
                return job_status(
                    session, job, generation=bound.generation, previous=fresh.get("status"), now=utc_now()
                )

        self._write_status(obj, compute)
        self._mirror_events(obj, job_id)
        if self.config.cordon_excluded_nodes:
            with self.store.read() as session:
                nodes = excluded_nodes(session=session, job_id=job_id)
            for node in sorted(nodes - self._cordoned):
                self._cordon(node)

    def _write_status(self, obj: Mapping[str, Any], compute: Callable[[Mapping[str, Any]], dict]) -> None:
        """Replace the status when it changed; on 409 read the object again and recompute (three tries).
        Changes of progress and ETTR alone are written at most every `status_interval_seconds`."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        fresh: Mapping[str, Any] = obj
        for _ in range(3):
            status = compute(fresh)
            before = fresh.get("status") or {}
            if before == status:
                return
            recent = (
                time.monotonic() - self._status_written.get(key, -1e9) < self.config.status_interval_seconds
            )
            if recent and _without_progress(before) == _without_progress(status):
                return
            body = {**fresh, "status": status}
            try:
                answer = call_json(
                    self.custom.replace_namespaced_custom_object_status, GROUP, VERSION, meta["namespace"],
                    PLURAL, meta["name"], body,
                )  # fmt: skip
                self.cache.put(answer)
                self._status_written[key] = time.monotonic()
                return
            except ApiException as err:
                if err.status == 404:
                    return
                if err.status != 409:
                    raise
            fresh = call_json(
                self.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
            )
        log.warning("TrainingJob %s: status not written after 3 conflicts; next pass", _key(obj))

    def _mirror_events(self, obj: Mapping[str, Any], job_id: int) -> None:
        """The job's new store events as core/v1 Events on the TrainingJob (`kubectl describe tj`). Names are
        derived from the event's number, so a replica that sends one again gets 409 and moves on."""
        meta = obj["metadata"]
        with self.store.read() as session:
            after = self._mirrored.get(job_id)
            stmt = select(Event).where(Event.job_id == job_id).order_by(Event.seq.desc())
            if after is None:
                events = list(session.scalars(stmt.limit(MIRRORED_EVENTS_ON_START)))
            else:
                events = list(session.scalars(stmt.where(Event.seq > after)))
        for e in reversed(events):
            when = _iso(e.time) or utc_now()
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {
                    "name": f"{meta['name']}.{meta['uid'][:8]}.{e.seq}",
                    "namespace": meta["namespace"],
                },
                "involvedObject": {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "uid": meta["uid"],
                },
                "reason": e.reason,
                "message": (e.message or e.reason)[:1024],
                "type": "Warning" if e.type in WARNING_EVENT_TYPES else "Normal",
                "firstTimestamp": when,
                "lastTimestamp": when,
                "count": 1,
                "source": {"component": COMPONENT},
                "reportingComponent": COMPONENT,
                "reportingInstance": self.config.identity,
            }
            try:
                call_json(self.core.create_namespaced_event, meta["namespace"], body)
            except ApiException as err:
                if err.status != 409:
                    raise
            self._mirrored[job_id] = e.seq
        self._mirrored.setdefault(job_id, 0)

    def _cordon(self, node: str) -> None:
        """Mark an excluded node unschedulable, so other workloads stop landing there too (a person uncordons)."""
        try:
            call_json(
                self.core.patch_node, node, {"spec": {"unschedulable": True}},
                _content_type="application/strategic-merge-patch+json",
            )  # fmt: skip
            log.warning("node %s cordoned: excluded as a straggler", node)
        except ApiException as err:
            if err.status != 404:
                raise
            log.warning("node %s: not cordoned, no such node", node)
        self._cordoned.add(node)


def _without_progress(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in ("progress", "ettr")}


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _is(obj: Mapping[str, Any], namespace: str, uid: str) -> bool:
    meta = obj["metadata"]
    return meta["namespace"] == namespace and meta["uid"] == uid


# ------------------------------------------------------------------------------------------------ health


def serve_health(
    operator: Operator, host: str, port: int, *, stale_seconds: float | None = None
) -> ThreadingHTTPServer:
    """`/healthz`: 200 while the loop is alive (leader or standby), 503 once it has not turned for
    `stale_seconds` (a stuck pass): the kubelet then restarts the pod. By default a minute more than a pass
    may take while it stops a gang (it waits out the grace period)."""
    if stale_seconds is None:
        stale_seconds = 60.0 + 2 * operator.config.controller.cancel_grace_seconds

    class Health(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/healthz":
                self.send_error(404)
                return
            alive = time.monotonic() - operator.heartbeat < stale_seconds
            role = "leader" if operator.leading else "standby"
            body = f"{'ok' if alive else 'stalled'} ({role})\n".encode()
            self.send_response(200 if alive else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Health)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    return server
