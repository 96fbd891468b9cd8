"""`vlctl submit | list | status | events | logs | cancel` against a Kubernetes cluster: TrainingJob objects,
which the operator (k8s/operator.py) runs and reports on in their status and Events.

Decisions:

- Where a command goes, one rule for the six commands: `--backend kubernetes|local` when given; else
  `--context NAME` means the cluster; else the environment variable VLCTL_BACKEND (`kubernetes` or `local`);
  else the controller's store (VLCTL_DATABASE_URL), as before. A spec's own `backend:` field never chooses:
  with the cluster it must be unset (it becomes `kubernetes`) or `kubernetes`, which is what the operator admits.
- Which cluster: the kubeconfig's current context (KUBECONFIG, else ~/.kube/config), or `--context NAME`; inside
  a pod (KUBERNETES_SERVICE_HOST set, no KUBECONFIG, no `--context`) the pod's service account. Namespace:
  `--namespace`, else a TrainingJob file's own, else the context's, else "default".
- `submit` validates everything before the one write: the spec (controller.spec), the name's CRD rule and what
  the operator would refuse at admission (`k8s.render.render_job`: s3:// checkpoints, pod-name lengths). FILE is
  a job spec (as the store's `submit` takes) or a TrainingJob object (k8s/examples; labels and annotations kept).
- `cancel` deletes the TrainingJob (only the uid that was confirmed): the operator's finalizer stops the pods
  and removes the object. A job that already ended is refused, as in the store (`kubectl delete` removes it).
- `status`/`list` JSON use the store's keys where the TrainingJob has the value (phase in its lowercase store
  form, reason and message from the condition that holds, attempt, restarts, checkpoint, ETTR, progress), plus
  namespace, uid and the raw conditions. `events` lists the core/v1 Events on the object, oldest first.
- `logs` reads the attempt's pods, one per node, or one rank's lines; `--follow` streams them: see
  cli/cluster_logs.py.
- Exit codes, as for the store: 2 bad input (invalid spec, unknown job, context or namespace, a name taken),
  3 the API server cannot be reached (the line names its URL), 1 the request failed (403 names verb and
  resource). The Kubernetes client is imported only when a command goes to a cluster.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from controller.spec import SpecError
from k8s import render as manifests
from k8s.api import (
    KubeApi,
    KubeConfigError,
    NoSuchContext,
    api_message,
    load_configuration,
    one_line,
    status_body,
)
from k8s.crd import (
    API_VERSION,
    GROUP,
    KIND,
    MAX_JOB_NAME,
    PLURAL,
    VERSION,
    env_secrets,
    object_from_spec,
)

from .errors import EXIT_FAILURE, EXIT_UNAVAILABLE, EXIT_USER_ERROR, CliError
from .output import OutputFormat, emit, human_count, stderr
from .render import DEFAULT_IMAGE, read_job

ENV_BACKEND = "VLCTL_BACKEND"
DEFAULT_NAMESPACE = "default"
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0
FOLLOW_POLL_SECONDS = 1.0  # how often `logs --follow` looks for pods that started, and for a new attempt
TERMINAL = ("succeeded", "failed", "cancelled")
RESOURCE = f"{PLURAL}.{GROUP}"
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_JOB_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the CRD's x-kubernetes-validations rule
# Which condition's reason and message explain the phase, most telling first.
_PHASE_CONDITIONS = ("Failed", "Succeeded", "Restarting", "Running", "Created")


class BackendChoice(StrEnum):
    local = "local"
    kubernetes = "kubernetes"


_WHERE = "default: --context's cluster, else VLCTL_BACKEND, else local"
BackendOption = Annotated[
    BackendChoice | None,
    typer.Option(help=f"local: the controller's store; kubernetes: the kubeconfig's cluster ({_WHERE})"),
]
ContextOption = Annotated[
    str | None,
    typer.Option("--context", help="this kubeconfig context's cluster (implies --backend kubernetes)"),
]
_NS_HELP = "the cluster's namespace (default: the context's, else 'default')"
NamespaceOption = Annotated[str | None, typer.Option("--namespace", "-n", help=_NS_HELP)]
NamespaceLongOption = Annotated[str | None, typer.Option("--namespace", help=_NS_HELP)]  # logs: -n is --lines


@dataclass(frozen=True, slots=True)
class Target:
    """A command bound for the cluster: the context (None: the current one) and the namespace asked for."""

    context: str | None
    namespace: str | None


def target(backend: BackendChoice | None, context: str | None, namespace: str | None) -> Target | None:
    """The cluster the command goes to, or None for the store (the rule in the module docstring)."""
    if backend is None and context is None:
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env not in tuple(BackendChoice):
            raise CliError(f"{ENV_BACKEND}: expected local or kubernetes, got {env!r}")
        backend = BackendChoice(env) if env else None
    if backend is BackendChoice.local and context is not None:
        raise CliError("--context: names a Kubernetes context, not for --backend local")
    if backend is BackendChoice.kubernetes or context is not None:
        if namespace is not None and not _DNS1123_LABEL.match(namespace):
            raise CliError(f"--namespace: {namespace!r} is not a valid namespace name (a DNS-1123 label)")
        return Target(context=context, namespace=namespace)
    if namespace is not None:
        raise CliError(
            "--namespace: only for a cluster: add --backend kubernetes or --context (or set VLCTL_BACKEND)"
        )
    return None


# ------------------------------------------------------------------------------------------------ connection


@dataclass(frozen=True, slots=True)
class Cluster:
    """A connection to the cluster (k8s.api's `KubeApi`), its server's URL, and the namespace commands use."""

    kube: KubeApi
    server: str
    namespace: str


def connect(where: Target, *, file_namespace: str | None = None) -> Cluster:
    """Load the kubeconfig context (or the pod's service account) and choose the namespace."""
    from kubernetes import client

    try:
        configuration, own = load_configuration(os.environ.get("KUBECONFIG"), context=where.context)
    except NoSuchContext as err:
        names = ", ".join(err.contexts) or "none"
        raise CliError(
            f"--context: no context named {err.context!r} in {err.kubeconfig} (contexts: {names})"
        ) from None
    except KubeConfigError as err:
        raise CliError(
            f"{err.source}: cannot load the Kubernetes configuration ({one_line(err.reason)})"
        ) from None
    api_client = client.ApiClient(configuration)
    api_client.user_agent = "vlctl"
    return Cluster(
        kube=KubeApi(
            api_client, timeout_seconds=READ_TIMEOUT_SECONDS, connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS
        ),
        server=configuration.host,
        namespace=where.namespace or file_namespace or own or DEFAULT_NAMESPACE,
    )


@contextmanager
def api_call(cl: Cluster, verb: str, resource: str, name: str | None = None) -> Iterator[None]:
    """API failures as one-line CliErrors with their exit codes (see the module docstring)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as err:
        raise _api_failure(err, cl, verb, resource, name) from None
    except (urllib3.exceptions.HTTPError, OSError) as err:  # refused, unresolvable, timed out, cut off
        raise _unreachable(cl, err) from None


def _unreachable(cl: Cluster, err: BaseException) -> CliError:
    reason = getattr(err, "reason", None) or err
    why = re.sub(r"<[^>]*>:\s*", "", str(reason))  # urllib3 names the connection object first
    return CliError(
        f"cannot reach the Kubernetes API server at {cl.server}: {one_line(why)}", EXIT_UNAVAILABLE
    )


def _api_failure(err: Any, cl: Cluster, verb: str, resource: str, name: str | None) -> CliError:
    body = status_body(err)
    details = body.get("details") or {}
    message = api_message(err)
    what = f"{verb} {resource}" + (f" {name}" if name else "") + f" in namespace {cl.namespace}"
    code = err.status
    if code == 404 and details.get("kind") == "namespaces":
        return CliError(f"no namespace {details.get('name')!r} in the cluster at {cl.server}")
    if code == 404 and resource == RESOURCE and name is not None and details.get("name") == name:
        return CliError(f"no TrainingJob named {name!r} in namespace {cl.namespace}")
    if code == 404 and not details.get("name") and resource == RESOURCE:
        return CliError(
            f"{what}: the API server at {cl.server} does not serve {API_VERSION} {KIND}: is the CRD installed "
            "(kubectl apply -k k8s/base)?",
            EXIT_FAILURE,
        )
    if code == 409 and verb == "create":
        return CliError(f"TrainingJob {name!r} already exists in namespace {cl.namespace}")
    if code == 422:
        return CliError(f"{what}: the API server refused it: {message}")
    if code == 401:
        return CliError(
            f"{what}: unauthorized: the API server at {cl.server} refused the credentials", EXIT_FAILURE
        )
    if code == 403:
        return CliError(f"{what}: forbidden ({message})", EXIT_FAILURE)
    if code == 0:  # the client's own failure before any answer (TLS)
        return CliError(f"cannot reach the Kubernetes API server at {cl.server}: {message}", EXIT_UNAVAILABLE)
    if code in (502, 503, 504):  # a proxy or load balancer in front of it answered
        return CliError(
            f"cannot reach the Kubernetes API server at {cl.server}: {code} {message}", EXIT_UNAVAILABLE
        )
    return CliError(f"{what}: {code} {body.get('reason') or err.reason}: {message}", EXIT_FAILURE)


def get_job(cl: Cluster, name: str) -> dict[str, Any]:
    with api_call(cl, "get", RESOURCE, name):
        return cl.kube.call(
            cl.kube.custom.get_namespaced_custom_object, GROUP, VERSION, cl.namespace, PLURAL, name
        )


# ------------------------------------------------------------------------------------------------ views


def _phase_reason(status: Mapping[str, Any]) -> tuple[str | None, str | None]:
    held = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    for type_ in _PHASE_CONDITIONS:
        if type_ in held:
            return held[type_].get("reason"), held[type_].get("message") or None
    return None, None


def job_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A `list` row: the store's keys where the TrainingJob has the value. No status: the operator has not
    admitted the object yet (phase None)."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    checkpoint = status.get("lastCheckpoint") or {}
    progress = status.get("progress") or {}
    reason, message = _phase_reason(status)
    phase = status.get("phase")
    return {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "phase": phase.lower() if isinstance(phase, str) else None,
        "reason": reason,
        "message": message,
        "attempt": status.get("attempt", 0),
        "restarts": status.get("restarts", 0),
        "restarts_counted": status.get("restartsCounted", 0),
        "last_checkpoint_step": checkpoint.get("step"),
        "last_checkpoint_uri": checkpoint.get("uri"),
        "ettr": status.get("ettr"),
        "step": progress.get("step"),
        "total_steps": progress.get("totalSteps"),
        "created": meta.get("creationTimestamp"),
        "deleted": meta.get("deletionTimestamp"),
        "backend": "kubernetes",
        "uid": meta.get("uid"),
    }


def status_dict(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What `status` shows: the `list` row plus progress, the checkpoint, stragglers and the raw conditions."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    resources = (obj.get("spec") or {}).get("resources") or {}
    progress = status.get("progress") or {}
    row = job_dict(obj)
    checkpoint = status.get("lastCheckpoint")
    fraction = None
    if row["step"] is not None and row["total_steps"]:
        fraction = min(1.0, row["step"] / row["total_steps"])
    return {
        **row,
        "progress": fraction,
        "loss": progress.get("loss"),
        "tokens_per_second": progress.get("tokensPerSecond"),
        "last_checkpoint": None
        if not checkpoint
        else {
            "step": checkpoint.get("step"),
            "uri": checkpoint.get("uri"),
            "committed_at": checkpoint.get("time"),
        },
        "stragglers": list(status.get("stragglers") or []),
        "excluded_nodes": list(status.get("excludedNodes") or []),
        "nodes": resources.get("nodes", 1),
        "procs_per_node": resources.get("procs_per_node", 1),
        "generation": meta.get("generation"),
        "observed_generation": status.get("observedGeneration"),
        "finalizers": list(meta.get("finalizers") or []),
        "conditions": list(status.get("conditions") or []),
    }


def _age(timestamp: str | None, now: datetime | None = None) -> str:
    if not timestamp:
        return ""
    seconds = max(0, int(((now or datetime.now(UTC)) - _parse_time(timestamp)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _parse_time(timestamp: str) -> datetime:
    parsed = datetime.fromisoformat(timestamp)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def _list_table(rows: list[dict[str, Any]]) -> Table:
    """The CRD's printer columns (`kubectl get tj`)."""
    t = Table()
    for column in ("name", "phase", "step", "restarts", "checkpoint", "ettr", "age"):
        t.add_column(column)
    for r in rows:
        phase = (r["phase"] or "(not admitted)") + (" (deleting)" if r["deleted"] else "")
        t.add_row(
            r["name"],
            phase,
            _cell(r["step"]) + _cell(r["total_steps"], " / {}"),
            str(r["restarts"]),
            _cell(r["last_checkpoint_step"]),
            _cell(r["ettr"], "{:.0%}"),
            _age(r["created"]),
        )
    return t


def _render_status(d: dict[str, Any]) -> Group:
    phase = d["phase"] or "not admitted by the operator yet"
    why = f" ({d['reason']})" if d["reason"] else ""
    lines = [
        ("job", f"{d['namespace']}/{d['name']}  {phase}{why}{': ' + d['message'] if d['message'] else ''}")
    ]
    if d["deleted"]:
        lines.append(
            ("deleting", f"since {d['deleted']}; finalizers: {', '.join(d['finalizers']) or 'none'}")
        )
    lines.append(("gang", f"{d['nodes']} nodes x {d['procs_per_node']} processes, attempt {d['attempt']}"))
    lines.append(("restarts", f"{d['restarts']} ({d['restarts_counted']} counted toward the limit)"))
    if d["step"] is not None:
        parts = [f"step {d['step']}" + _cell(d["total_steps"], " / {}") + _cell(d["progress"], " ({:.1%})")]
        if d["loss"] is not None:
            parts.append(f"loss {d['loss']:.4f}")
        if d["tokens_per_second"] is not None:
            parts.append(f"{human_count(int(d['tokens_per_second']))} tokens/s")
        lines.append(("progress", ", ".join(parts)))
    ckpt = d["last_checkpoint"]
    lines.append(("checkpoint", "none yet" if ckpt is None else f"step {ckpt['step']} at {ckpt['uri']}"))
    if d["ettr"] is not None:
        lines.append(("ettr", f"{d['ettr']:.0%}"))
    if d["stragglers"]:
        flagged = ", ".join(
            f"rank {s.get('rank')} on {s.get('node', '?')}" + _cell(s.get("score"), " (score {:.1f})")
            for s in d["stragglers"]
        )
        lines.append(("stragglers", flagged))
    if d["excluded_nodes"]:
        lines.append(("excluded", ", ".join(d["excluded_nodes"])))
    width = max(len(k) for k, _ in lines)
    parts: list[Any] = [Text("\n".join(f"{k:<{width}}  {v}" for k, v in lines))]
    if d["conditions"]:
        t = Table(box=box.SIMPLE_HEAD)
        for column in ("condition", "status", "reason", "since", "message"):
            t.add_column(column, no_wrap=column != "message")
        for c in d["conditions"]:
            since = _age(c.get("lastTransitionTime"))
            t.add_row(
                c.get("type"),
                c.get("status"),
                c.get("reason"),
                since and f"{since} ago",
                Text(c.get("message", "")),
            )
        parts.append(t)
    return Group(*parts)


# ------------------------------------------------------------------------------------------------ commands


def submit(where: Target, file: Path, output: OutputFormat) -> None:
    """Create the TrainingJob for FILE, validated first as the operator would validate it."""
    try:
        spec, given = read_job(file)
    except SpecError as err:
        raise CliError(str(err)) from None
    if spec.backend != "kubernetes" and "backend" in spec.model_fields_set:
        raise CliError(f"{file}: backend: a TrainingJob runs on the kubernetes backend, got {spec.backend!r}")
    spec.backend = "kubernetes"
    if len(spec.name) > MAX_JOB_NAME or not _JOB_NAME.match(spec.name):
        raise CliError(
            f"{file}: name: {spec.name!r} must start with a letter and be at most {MAX_JOB_NAME} characters "
            "(it prefixes the names of the job's pods and Service)"
        )
    meta = given.get("metadata") or {}
    if where.namespace and meta.get("namespace") not in (None, where.namespace):
        raise CliError(
            f"--namespace: {where.namespace!r} differs from the file's namespace {meta['namespace']!r}"
        )
    cl = connect(where, file_namespace=meta.get("namespace"))
    obj = object_from_spec(spec, namespace=cl.namespace)
    obj["metadata"] |= {k: dict(meta[k]) for k in ("labels", "annotations") if meta.get(k)}
    try:  # what the operator refuses at admission, before anything is written
        manifests.render_job(
            spec, namespace=cl.namespace, attempt=1, resume_from=None, excluded_nodes=(), image=DEFAULT_IMAGE,
            owner=None, gang="none", queue=None, env_secrets=env_secrets(obj),
        )  # fmt: skip
    except ValueError as err:
        raise CliError(f"{file}: {err}") from None
    with api_call(cl, "create", RESOURCE, spec.name):
        created = cl.kube.call(
            cl.kube.custom.create_namespaced_custom_object, GROUP, VERSION, cl.namespace, PLURAL, obj
        )
    emit(
        status_dict(created),
        output,
        lambda d: f"created TrainingJob {d['namespace']}/{d['name']} at {cl.server}",
    )


def list_jobs(where: Target, output: OutputFormat) -> None:
    cl = connect(where)
    with api_call(cl, "list", RESOURCE):
        answer = cl.kube.call(
            cl.kube.custom.list_namespaced_custom_object, GROUP, VERSION, cl.namespace, PLURAL
        )
    rows = sorted((job_dict(o) for o in answer.get("items") or []), key=lambda r: r["name"])
    emit(rows, output, _list_table)


def status(where: Target, name: str, output: OutputFormat) -> None:
    cl = connect(where)
    emit(status_dict(get_job(cl, name)), output, _render_status)


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


def events(where: Target, name: str, output: OutputFormat) -> None:
    """The Events on the TrainingJob, oldest first; those of a deleted one while the API server keeps them."""
    cl = connect(where)
    row = job_or_none(cl, name)
    uid = None if row is None else row["uid"]
    selector = f"involvedObject.kind={KIND},involvedObject.name={name}"
    with api_call(cl, "list", "events"):
        answer = cl.kube.call(cl.kube.core.list_namespaced_event, cl.namespace, field_selector=selector)
    rows = [_event_dict(e) for e in answer.get("items") or []]
    if uid is not None:  # not those of an earlier TrainingJob of the same name
        rows = [r for r in rows if r["uid"] in (None, uid)]
    elif not rows:
        raise CliError(f"no TrainingJob named {name!r} in namespace {cl.namespace}")
    else:
        stderr.print(f"TrainingJob {name} no longer exists; its last events:", markup=False, highlight=False)
    epoch = datetime.min.replace(tzinfo=UTC)
    rows.sort(key=lambda r: (_parse_time(r["time"]) if r["time"] else epoch, r["seq"] or 0))

    def table(rows: list[dict[str, Any]]) -> Table:
        t = Table()
        for column in ("time", "type", "reason", "message"):
            t.add_column(column)
        for r in rows:
            count = f" (x{r['count']})" if r["count"] > 1 else ""
            t.add_row((r["time"] or "")[:19], r["type"], r["reason"], Text(f"{r['message'] or ''}{count}"))
        return t

    emit(rows, output, table)


def cancel(where: Target, name: str, yes: bool, output: OutputFormat) -> None:
    from .jobs import confirm  # here: jobs.py imports this module

    cl = connect(where)
    obj = get_job(cl, name)
    row = job_dict(obj)
    if row["deleted"]:
        stderr.print(f"TrainingJob {name} is already being deleted", markup=False, highlight=False)
        emit(row, output, lambda d: f"{d['name']}: deleting")
        return
    if row["phase"] in TERMINAL:
        raise CliError(
            f"cancel: job {name!r} is {row['phase']}; `kubectl delete trainingjob {name} -n {cl.namespace}` "
            "removes it"
        )
    confirm("cancel", f"cancel job {name} (delete TrainingJob {cl.namespace}/{name})?", yes)
    options = {"propagationPolicy": "Background", "preconditions": {"uid": row["uid"]}}
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
        f"cancelled {name}: " + ("the operator stops its pods, then removes it" if finalizing else "deleted"),
        markup=False,
        highlight=False,
    )
    emit(data, output, lambda d: f"{d['name']}: cancelled")


def logs(where: Target, name: str, **options: Any) -> None:
    """`vlctl logs` in the cluster: cli/cluster_logs.py, imported here because it imports this module. The
    poll interval is read at each call, so it stays one setting with the other timings above."""
    from .cluster_logs import logs as show_logs

    show_logs(where, name, poll_seconds=FOLLOW_POLL_SECONDS, **options)


def job_or_none(cl: Cluster, name: str) -> dict[str, Any] | None:
    """The job's `list` row, or None when there is no TrainingJob of that name."""
    try:
        return job_dict(get_job(cl, name))
    except CliError as err:
        if err.exit_code != EXIT_USER_ERROR:
            raise
        return None
