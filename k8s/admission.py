"""TrainingJobs into the controller's store: the finalizer, admission, binding, and deletion.

Per TrainingJob, every pass (`Admission.sync`): the finalizer on; admitted into the store once (spec validated;
an invalid one gets the Failed condition with its one-line reason and nothing is launched); deleted ones are
cancelled, every object of theirs deleted, the finalizer removed. Then (`forget_orphans`) store jobs bound to a
TrainingJob that no longer exists are cancelled and forgotten.

Decisions:

- State: the controller's store (VLCTL_DATABASE_URL) holds each job's history; the cluster's TrainingJob objects
  say what exists. A store job is bound to its object (namespace, uid, generation) by an event written when it
  is admitted. A store job whose object is gone (or was replaced by one of the same name, or whose store is
  behind the object's status: a replica with its own SQLite file after a failover) is cancelled and forgotten;
  the object is admitted again and its attempts continue after the number in its status. With one shared
  database (PostgreSQL) a new leader re-attaches to the running pods; with a file per replica it relaunches
  from the newest checkpoint.
- Names: a store job is named like its TrainingJob, so names are unique across namespaces; a second
  TrainingJob of a name another namespace uses gets the Failed condition.
- The spec is the one admitted (the store's copy): edits after admission are not applied, only warned about
  once per generation.
- The finalizer is added and removed with a merge patch carrying the resourceVersion read, so another client's
  finalizer is never lost; it is removed only once every object of the job is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from sqlalchemy import select

from controller import states
from controller.domain.phases import ACTIVE_PHASES, EventType
from controller.spec import SpecError, TrainingJobSpec
from controller.store.models import Event, Job
from controller.store.repo import JobExists, append_event, create_job
from controller.store.session import Store
from k8s import render
from k8s.api import api_error, call_json
from k8s.backend import JobBinding, KubernetesBackend
from k8s.config import OperatorConfig
from k8s.crd import GROUP, PLURAL, VERSION, env_secrets, owner_of, spec_from_object
from k8s.events import EventMirror
from k8s.status import StatusWriter
from k8s.watch import TrainingJobCache, object_key

log = logging.getLogger(__name__)

FINALIZER = f"{GROUP}/cleanup"
# The store event that binds a job to its object (data: namespace, uid, generation).
REASON_BOUND = "TrainingJobBound"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_NAME_TAKEN = "NameTaken"


@dataclass
class Bound:
    """A store job's tie to its TrainingJob (from the store's TrainingJobBound event)."""

    job_id: int
    namespace: str
    uid: str
    generation: int


def bound_jobs(session: Any) -> dict[str, Bound]:
    """Store job name -> its binding, for every job bound to a TrainingJob (the newest binding wins)."""
    rows = session.execute(
        select(Job.name, Job.id, Event.data)
        .join(Event, Event.job_id == Job.id)
        .where(Event.reason == REASON_BOUND)
        .order_by(Event.seq)
    )
    return {
        name: Bound(job_id, data["namespace"], data["uid"], int(data.get("generation") or 1))
        for name, job_id, data in rows
    }


class Admission:
    """Keeps the store's jobs in line with the TrainingJobs, and each admitted job's `JobBinding` for the
    backend (`binding`)."""

    def __init__(
        self,
        store: Store,
        config: OperatorConfig,
        *,
        custom: client.CustomObjectsApi,
        cache: TrainingJobCache,
        backend: KubernetesBackend,
        status: StatusWriter,
        events: EventMirror,
    ) -> None:
        self.store = store
        self.config = config
        self.custom = custom
        self.cache = cache
        self.backend = backend
        self.status = status
        self.events = events
        self.bindings: dict[str, JobBinding] = {}  # job name -> what the backend runs it with
        self._warned_generation: set[tuple[str, int]] = set()

    def binding(self, job_name: str) -> JobBinding:
        return self.bindings[job_name]

    # ---------------------------------------------------------------------------- admission

    def sync(self, obj: dict[str, Any], bindings: Mapping[str, Bound]) -> None:
        """One TrainingJob, once per pass: finalize it if deleted, else finalizer on, admit or bind it.
        `bindings` is `bound_jobs` read at the start of the pass."""
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
            # Bound in a namespace outside the watch: whether its object still exists cannot be told.
            unseen = self.config.watch_namespace not in (None, bound.namespace)
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
        self.bindings[name] = JobBinding(
            namespace=namespace, spec=spec, owner=owner_of(obj), env_secrets=env_secrets(obj)
        )
        generation = int(meta.get("generation") or 1)
        if generation != bound.generation and (name, generation) not in self._warned_generation:
            self._warned_generation.add((name, generation))
            log.warning(
                "TrainingJob %s: spec changes after admission (generation %d, admitted %d) are not applied",
                object_key(obj),
                generation,
                bound.generation,
            )

    def _validate(self, obj: Mapping[str, Any]) -> TrainingJobSpec:
        """The spec as the controller will run it; SpecError or ValueError with the one-line reason."""
        spec = spec_from_object(obj)
        if "backend" in spec.model_fields_set and spec.backend != "kubernetes":
            raise ValueError(
                f"TrainingJob {object_key(obj)}: backend: a TrainingJob runs on the kubernetes backend, "
                f"got {spec.backend!r}"
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
            raise ValueError(f"TrainingJob {object_key(obj)}: {err}") from None
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
                message=f"bound to TrainingJob {object_key(obj)} (generation {generation})",
                data={"namespace": meta["namespace"], "uid": meta["uid"], "generation": generation},
            )
        self.bindings[spec.name] = JobBinding(
            namespace=meta["namespace"], spec=spec, owner=owner_of(obj), env_secrets=env_secrets(obj)
        )
        log.info("TrainingJob %s admitted", object_key(obj))

    def _reject(self, obj: dict[str, Any], reason: str, message: str) -> None:
        self.bindings.pop(obj["metadata"]["name"], None)
        self.status.write_rejected(obj, reason, message)

    def _forget(self, name: str, why: str) -> None:
        """Cancel a store job whose TrainingJob is gone (or another now) and delete its history."""
        with self.store.transaction() as session:
            job = session.scalars(select(Job).where(Job.name == name)).one_or_none()
            if job is None:
                return
            if job.phase in ACTIVE_PHASES:
                states.cancel(job, session=session, message=f"cancelled: {why}")
            self.events.forget(job.id)
            session.delete(job)
        self.bindings.pop(name, None)
        log.info("job %s forgotten: %s", name, why)

    def forget_orphans(self, objects: Sequence[Mapping[str, Any]]) -> None:
        present = {(o["metadata"]["namespace"], o["metadata"]["name"], o["metadata"]["uid"]) for o in objects}
        with self.store.read() as session:
            bound = bound_jobs(session)
        scope = self.config.watch_namespace
        for name, b in bound.items():
            if scope not in (None, b.namespace) or (b.namespace, name, b.uid) in present:
                continue
            if any(o["metadata"]["name"] == name for o in objects):
                continue  # replaced by a new object of that name: `sync` handles it
            try:
                self.backend.remove_job(name, b.namespace)  # owner references would too, eventually
            except ApiException as err:
                log.warning("job %s: deleting the objects of a gone TrainingJob: %s", name, api_error(err))
                continue
            self._forget(name, f"its TrainingJob {b.namespace}/{name} no longer exists")

    # ---------------------------------------------------------------------------- deletion

    def _finalize(self, obj: dict[str, Any], bound: Bound | None) -> None:
        meta = obj["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        ours = bound is not None and (bound.namespace, bound.uid) == (namespace, meta["uid"])
        if ours:
            assert bound is not None
            with self.store.transaction() as session:
                job = session.get(Job, bound.job_id)
                if job is not None and job.phase in ACTIVE_PHASES:
                    states.cancel(job, session=session, message=f"TrainingJob {object_key(obj)} deleted")
        left = self.backend.remove_job(name, namespace)
        if left:
            log.info(
                "TrainingJob %s: waiting for %d object(s) to go before removing the finalizer",
                object_key(obj),
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


def _is(obj: Mapping[str, Any], namespace: str, uid: str) -> bool:
    meta = obj["metadata"]
    return meta["namespace"] == namespace and meta["uid"] == uid
