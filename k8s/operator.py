"""The operator: TrainingJobs in the cluster, run by the controller core through the Kubernetes backend.

One pass (the leader's, every `poll_seconds` or sooner when a TrainingJob changes):

    each TrainingJob  -> finalizer on; admitted into the store once (spec validated; an invalid one gets the
                         Failed condition with its one-line reason and nothing is launched); deleted ones are
                         cancelled, every object of theirs deleted, the finalizer removed       (k8s.admission)
    the store         -> jobs bound to a TrainingJob that no longer exists are cancelled and forgotten
    the controller    -> `reconcile_once()`: launches, supervision, restarts (controller.reconciler)
    each TrainingJob  -> status written back when it changed (k8s.status); the job's new events become
                         Kubernetes Events (k8s.events); with --cordon-excluded-nodes, nodes excluded as
                         stragglers are cordoned

This module wires the parts and runs the loop. The others, each with its own decisions:

    k8s.config     the operator's settings (`OperatorConfig`)
    k8s.leader     Lease-based leader election; the API client that refuses writes while not the leader
    k8s.watch      list + watch of TrainingJobs into a cache
    k8s.admission  finalizers, admission and binding into the store, deletion
    k8s.status     the status and conditions from the store; writes with resourceVersion and 409 handling
    k8s.events     the job's timeline as core/v1 Events
    k8s.backend    the Kubernetes backend the controller launches and supervises gangs through
    k8s.api        the API client wrapper (dicts, timeouts, one-line errors)

Decisions:

- The official client directly, not kopf. The controller core already is the reconcile loop (level-triggered,
  idempotent, crash-safe through its store) and kopf would add a second one with its own state in annotations,
  its own retries and its own leader handling (kopf's peering is a "freeze" protocol over its own CRD, not a
  Lease). What we need from Kubernetes is small: one list+watch of TrainingJobs, CRUD of an attempt's objects,
  a status write with optimistic concurrency, and a Lease. The client is already a dependency; kopf is not.
- Every write, the backend's included, goes through one leader-guarded API client: a replica that loses the
  Lease stops at its next request (`NotLeader`) and stands down; the gangs keep running for the next leader.
- Cordoning is a person's decision to undo: the operator only cordons (with the optional RBAC of
  optional/node-cordon.yaml), never uncordons.
"""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.reconciler import Controller
from controller.store.records import excluded_nodes
from controller.store.session import Store
from k8s.admission import (
    FINALIZER,
    REASON_BOUND,
    REASON_INVALID_SPEC,
    REASON_NAME_TAKEN,
    Admission,
    Bound,
    bound_jobs,
)
from k8s.api import api_error, call_json
from k8s.backend import JobBinding, KubernetesBackend, pod_config, resume_point
from k8s.config import COMPONENT, LEASE_NAME, OperatorConfig
from k8s.crd import owner_of
from k8s.events import MIRRORED_EVENTS_ON_START, WARNING_EVENT_TYPES, EventMirror
from k8s.leader import LeaderElector, LeaderGuardedApiClient, NotLeader
from k8s.status import (
    REASON_ADMITTED,
    REASON_NO_STRAGGLERS,
    REASON_STRAGGLERS,
    StatusWriter,
    job_conditions,
    job_status,
    rejected_status,
    utc_now,
)
from k8s.watch import TrainingJobCache, object_key

# The names `k8s.operator` has always offered stay importable from here (cli/operator.py and the tests use it).
__all__ = [
    "COMPONENT",
    "FINALIZER",
    "LEASE_NAME",
    "MIRRORED_EVENTS_ON_START",
    "REASON_ADMITTED",
    "REASON_BOUND",
    "REASON_INVALID_SPEC",
    "REASON_NAME_TAKEN",
    "REASON_NO_STRAGGLERS",
    "REASON_STRAGGLERS",
    "WARNING_EVENT_TYPES",
    "LeaderElector",
    "LeaderGuardedApiClient",
    "NotLeader",
    "Operator",
    "OperatorConfig",
    "TrainingJobCache",
    "job_conditions",
    "job_status",
    "owner_of",
    "pod_config",
    "rejected_status",
    "resume_point",
    "serve_health",
    "utc_now",
]

log = logging.getLogger(__name__)


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
            resolve=self._binding,
            gang=config.gang,
            queue=config.queue,
            scheduling_timeout_seconds=config.scheduling_timeout_seconds,
            metrics=config.metrics,
            prometheus_url=config.prometheus_url,
        )
        self.controller = Controller(store, backends={"kubernetes": self.backend}, config=config.controller)
        self.status = StatusWriter(
            store, self.custom, self.cache, interval_seconds=config.status_interval_seconds
        )
        self.events = EventMirror(store, self.core, identity=config.identity)
        self.admission = Admission(
            store,
            config,
            custom=self.custom,
            cache=self.cache,
            backend=self.backend,
            status=self.status,
            events=self.events,
        )
        self.leading = False
        self.heartbeat = time.monotonic()  # /healthz: the loop is alive
        self._cordoned: set[str] = set()

    def _binding(self, job_name: str) -> JobBinding:
        """The backend's `resolve`: looked up when it is called, since admission is made after the backend."""
        return self.admission.binding(job_name)

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
        self.events.reset()
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
            bound = bound_jobs(session)
        for obj in objects:
            try:
                self.admission.sync(obj, bound)
            except (ApiException, ValueError, RuntimeError) as err:
                detail = api_error(err) if isinstance(err, ApiException) else str(err)
                log.warning("TrainingJob %s: %s", object_key(obj), detail)
        self.admission.forget_orphans(objects)
        self.controller.reconcile_once()
        with self.store.read() as session:
            bound = bound_jobs(session)
        for obj in objects:
            b = bound.get(obj["metadata"]["name"])
            if obj["metadata"].get("deletionTimestamp") or b is None or b.uid != obj["metadata"]["uid"]:
                continue
            try:
                self._publish(obj, b)
            except ApiException as err:
                log.warning("TrainingJob %s: %s", object_key(obj), api_error(err))

    # ---------------------------------------------------------------------------- status, events, nodes

    def _publish(self, obj: dict[str, Any], bound: Bound) -> None:
        # Events first: a client that sees a phase in the status finds the event that led to it (a refused Event
        # must not hold the status back, though).
        try:
            self.events.mirror(obj, bound.job_id)
        except ApiException as err:
            log.warning("TrainingJob %s: events not sent: %s", object_key(obj), api_error(err))
        self.status.write_job_status(obj, job_id=bound.job_id, generation=bound.generation)
        if self.config.cordon_excluded_nodes:
            with self.store.read() as session:
                nodes = excluded_nodes(session=session, job_id=bound.job_id)
            for node in sorted(nodes - self._cordoned):
                self._cordon(node)

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
