"""The job commands against a Kubernetes cluster (`--backend kubernetes`, `--context`, or VLCTL_BACKEND): the
cluster's `JobsClient` (cli/client.py), over TrainingJob objects, which the operator (k8s/operator.py) runs and
reports on in their status and Events.

Decisions:

- `submit` validates everything before the one write: the spec (controller.spec), the name's CRD rule and what
  the operator would refuse at admission (`k8s.render.render_job`: s3:// checkpoints, pod-name lengths). FILE is
  a job spec (as the store's `submit` takes) or a TrainingJob object (k8s/examples; labels and annotations kept).
  With the cluster the spec's `backend:` must be unset (it becomes `kubernetes`) or `kubernetes`, which is what
  the operator admits.
- `cancel` deletes the TrainingJob (only the uid that was confirmed): the operator's finalizer stops the pods
  and removes the object. A job that already ended is refused, as in the store (`kubectl delete` removes it).
- `status`/`list` read the TrainingJob back as the job's view (k8s.status.view_from_object), so the CLI renders
  one view whichever backend answered; `events` lists the core/v1 Events on the object, oldest first.
- `logs` reads the attempt's pods, one per node, or one rank's lines; `--follow` streams them: see
  cli/cluster_logs.py. Connection, namespaces and exit codes: cli/cluster_api.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controller.domain.phases import TERMINAL_PHASES
from controller.spec import SpecError
from controller.views import JobView
from k8s import render as manifests
from k8s.api import parse_time
from k8s.crd import GROUP, KIND, MAX_JOB_NAME, PLURAL, VERSION, env_secrets, object_from_spec
from k8s.status import view_from_object

from .client import Answer, LogRequest
from .cluster_api import RESOURCE, api_call, connect, get_job, job_or_none
from .errors import CliError
from .manifests import read_job
from .options import DEFAULT_IMAGE, Target, confirm
from .output import stderr

_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the CRD's x-kubernetes-validations rule


class ClusterJobs:
    """The job commands over the TrainingJobs of one cluster and namespace (see the module docstring)."""

    def __init__(self, where: Target) -> None:
        self.where = where

    def submit(self, file: Path) -> Answer:
        """Create the TrainingJob for FILE, validated first as the operator would validate it."""
        try:
            spec, given = read_job(file)
        except SpecError as err:
            raise CliError(str(err)) from None
        if spec.backend != "kubernetes" and "backend" in spec.model_fields_set:
            raise CliError(
                f"{file}: backend: a TrainingJob runs on the kubernetes backend, got {spec.backend!r}"
            )
        spec.backend = "kubernetes"
        if len(spec.name) > MAX_JOB_NAME or not _JOB_NAME.match(spec.name):
            raise CliError(
                f"{file}: name: {spec.name!r} must start with a letter and be at most {MAX_JOB_NAME} characters "
                "(it prefixes the names of the job's pods and Service)"
            )
        meta = given.get("metadata") or {}
        if self.where.namespace and meta.get("namespace") not in (None, self.where.namespace):
            raise CliError(
                f"--namespace: {self.where.namespace!r} differs from the file's namespace {meta['namespace']!r}"
            )
        cl = connect(self.where, file_namespace=meta.get("namespace"))
        obj = object_from_spec(spec, namespace=cl.namespace)
        obj["metadata"] |= {k: dict(meta[k]) for k in ("labels", "annotations") if meta.get(k)}
        try:  # what the operator refuses at admission, before anything is written
            manifests.render_job(
                spec, namespace=cl.namespace, attempt=1, resume_from=None, excluded_nodes=(),
                image=DEFAULT_IMAGE, owner=None, gang="none", queue=None, env_secrets=env_secrets(obj),
            )  # fmt: skip
        except ValueError as err:
            raise CliError(f"{file}: {err}") from None
        with api_call(cl, "create", RESOURCE, spec.name):
            created = cl.kube.call(
                cl.kube.custom.create_namespaced_custom_object, GROUP, VERSION, cl.namespace, PLURAL, obj
            )
        view = view_from_object(created)
        return Answer(view.as_dict(), f"created TrainingJob {cl.namespace}/{view.name} at {cl.server}")

    def list_jobs(self) -> list[JobView]:
        cl = connect(self.where)
        with api_call(cl, "list", RESOURCE):
            answer = cl.kube.call(
                cl.kube.custom.list_namespaced_custom_object, GROUP, VERSION, cl.namespace, PLURAL
            )
        return sorted((view_from_object(o) for o in answer.get("items") or []), key=lambda v: v.name)

    def status(self, name: str) -> JobView:
        return view_from_object(get_job(connect(self.where), name))

    def events(self, name: str) -> list[dict[str, Any]]:
        """The Events on the TrainingJob, oldest first; those of a deleted one while the API server keeps
        them."""
        cl = connect(self.where)
        obj = job_or_none(cl, name)
        uid = None if obj is None else (obj.get("metadata") or {}).get("uid")
        selector = f"involvedObject.kind={KIND},involvedObject.name={name}"
        with api_call(cl, "list", "events"):
            answer = cl.kube.call(cl.kube.core.list_namespaced_event, cl.namespace, field_selector=selector)
        rows = [_event_dict(e) for e in answer.get("items") or []]
        if uid is not None:  # not those of an earlier TrainingJob of the same name
            rows = [r for r in rows if r["uid"] in (None, uid)]
        elif not rows:
            raise CliError(f"no TrainingJob named {name!r} in namespace {cl.namespace}")
        else:
            stderr.print(
                f"TrainingJob {name} no longer exists; its last events:", markup=False, highlight=False
            )
        epoch = datetime.min.replace(tzinfo=UTC)
        rows.sort(key=lambda r: (parse_time(r["time"]) or epoch, r["seq"] or 0))
        return rows

    def cancel(self, name: str, yes: bool) -> Answer:
        cl = connect(self.where)
        view = view_from_object(get_job(cl, name))
        assert view.cluster is not None
        row = view.as_dict(ranks=False)
        if view.cluster.deleted:
            stderr.print(f"TrainingJob {name} is already being deleted", markup=False, highlight=False)
            return Answer(row, f"{name}: deleting")
        if view.phase in TERMINAL_PHASES:
            raise CliError(
                f"cancel: job {name!r} is {view.phase}; `kubectl delete trainingjob {name} -n {cl.namespace}` "
                "removes it"
            )
        confirm("cancel", f"cancel job {name} (delete TrainingJob {cl.namespace}/{name})?", yes)
        options = {"propagationPolicy": "Background", "preconditions": {"uid": view.cluster.uid}}
        with api_call(cl, "delete", RESOURCE, name):
            answer = cl.kube.call(
                cl.kube.custom.delete_namespaced_custom_object,
                GROUP,
                VERSION,
                cl.namespace,
                PLURAL,
                name,
                body=options,
            )
        after = (answer or {}).get("metadata") or {}  # the object still held by its finalizers, or a Status
        finalizing = bool(after.get("finalizers"))
        data = {**row, "deleted": after.get("deletionTimestamp") if finalizing else None}
        data |= {"cancelled": True, "finalizing": finalizing}
        stderr.print(
            f"cancelled {name}: "
            + ("the operator stops its pods, then removes it" if finalizing else "deleted"),
            markup=False,
            highlight=False,
        )
        return Answer(data, f"{name}: cancelled")

    def logs(self, name: str, request: LogRequest) -> None:
        from .cluster_logs import logs

        logs(self.where, name, request)


def _event_dict(e: Mapping[str, Any]) -> dict[str, Any]:
    meta = e.get("metadata") or {}
    when = (
        e.get("lastTimestamp")
        or e.get("eventTime")
        or e.get("firstTimestamp")
        or meta.get("creationTimestamp")
    )
    tail = str(meta.get("name", "")).rpartition(".")[2]
    return {
        "seq": int(tail) if tail.isdigit() else None,  # the operator names its Events `<job>.<uid>.<seq>`
        "time": when,
        "type": e.get("type"),
        "reason": e.get("reason"),
        "message": e.get("message"),
        "count": e.get("count") or 1,
        "source": (e.get("source") or {}).get("component") or e.get("reportingComponent"),
        "uid": (e.get("involvedObject") or {}).get("uid"),
    }
