"""`vlctl submit | list | status | events | logs | cancel | resume`: the job commands, each written once.

Where a command goes (the controller's store, or with `--backend kubernetes`, `--context` or VLCTL_BACKEND a
cluster's TrainingJobs) is cli/options.py's one rule, applied by `jobs_client`; both backends implement
cli/client.py's `JobsClient` and answer with the job's view (controller/views.py), which the table and
`--output json` below render the same way for both. `resume` is the store's alone: in a cluster the
operator resumes on its own, and a TrainingJob is re-created to start over.

Nothing heavy is imported at start-up (the store, the Kubernetes client, pydantic): `vlctl --help` imports this
module, so they load inside the commands that need them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .client import LogRequest
from .errors import EXIT_USER_ERROR, CliError
from .options import (
    BackendChoice,
    BackendOption,
    ContextOption,
    JobArgument,
    NamespaceLongOption,
    NamespaceOption,
    OutputOption,
    YesOption,
    confirm,
    target,
)
from .output import OutputFormat, emit, human_count, human_seconds, stderr

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from controller.store.models import Job
    from controller.views import JobView, RankView

    from .client import JobsClient

# A larger job's table: the ranks worth a look first, up to this many; JSON lists every rank.
STATUS_TABLE_MAX_RANKS = 32
STATUS_TABLE_MAX_NODES = 8  # a large job's node table: the nodes worth a look


def jobs_client(backend: BackendChoice | None, context: str | None, namespace: str | None) -> JobsClient:
    """The store's or the cluster's implementation (the rule in cli/options.py), imported only when chosen: the
    store's brings SQLAlchemy, the cluster's the Kubernetes client, and neither is needed to print help."""
    where = target(backend, context, namespace)
    if where is None:
        from .store_jobs import StoreJobs

        return StoreJobs()
    from .cluster import ClusterJobs

    return ClusterJobs(where)


# ------------------------------------------------------------------------------------------------ rendering


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return ""
    when = value if value.tzinfo else value.replace(tzinfo=UTC)
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def list_table(views: list[JobView]) -> Table:
    """The jobs, a row each (the same columns as `kubectl get tj`, plus the attempt)."""
    now = datetime.now(UTC)
    t = Table()
    for column in ("name", "phase", "step", "attempt", "restarts", "checkpoint", "ettr", "age"):
        t.add_column(column)
    for v in views:
        phase = "(not admitted)" if v.phase is None else str(v.phase)
        if v.cluster is not None and v.cluster.deleted:
            phase += " (deleting)"
        t.add_row(
            v.name,
            phase,
            _cell(v.step) + _cell(v.total_steps, " / {}"),
            str(v.attempt),
            str(v.restarts),
            "" if v.last_checkpoint is None else str(v.last_checkpoint.step),
            _cell(v.ettr, "{:.0%}"),
            _age(v.created, now),
        )
    return t


def _status_lines(v: JobView) -> list[tuple[str, str]]:
    c = v.cluster
    phase = "not admitted by the operator yet" if v.phase is None else str(v.phase)
    why = f" ({v.reason})" if v.reason else ""
    name = v.name if c is None else f"{c.namespace}/{v.name}"
    lines = [("job", f"{name}  {phase}{why}{': ' + v.message if v.message else ''}")]
    if c is not None and c.deleted:
        lines.append(("deleting", f"since {c.deleted}; finalizers: {', '.join(c.finalizers) or 'none'}"))
    if (a := v.current_attempt) is not None:
        resumed = f", resumed from step {a.resumed_from_step}" if a.resumed_from_step is not None else ""
        ended = f", ended {a.ended.isoformat()[:19]} ({a.exit_class})" if a.ended else ""
        started = a.started.isoformat()[:19] if a.started else "?"
        lines.append(("attempt", f"{a.number} on {', '.join(a.nodes)}, started {started}{resumed}{ended}"))
    elif v.nodes is not None:
        lines.append(("gang", f"{v.nodes} nodes x {v.procs_per_node} processes, attempt {v.attempt}"))
    lines.append(("restarts", f"{v.restarts} ({v.restarts_counted} counted toward the limit)"))
    if v.step is not None:
        parts = [f"step {v.step}" + _cell(v.total_steps, " / {}") + _cell(v.progress, " ({:.1%})")]
        if v.loss is not None:
            parts.append(f"loss {v.loss:.4f}")
        if v.tokens_per_second is not None:
            parts.append(f"{human_count(int(v.tokens_per_second))} tokens/s")
        if (eta := v.eta_seconds) is not None:
            parts.append(f"ETA {human_seconds(eta)}")
        if v.progress_at is not None:
            parts.append(f"last step at {v.progress_at.isoformat()[:19]}")
        lines.append(("progress", ", ".join(parts)))
    ckpt = v.last_checkpoint
    every = f", every {v.checkpoint_interval_steps} steps" if v.checkpoint_interval_steps else ""
    if ckpt is not None:
        lines.append(("checkpoint", f"step {ckpt.step} at {ckpt.uri}{every}"))
    else:
        lines.append(("checkpoint", f"none yet{every}"))
    if v.resume_from_step is not None:
        lines.append(("resume", f"the next launch resumes from step {v.resume_from_step}"))
    if v.productive_seconds is not None:
        lost = ", ".join(f"{cause} {human_seconds(s)}" for cause, s in v.lost_seconds.items() if s)
        ettr = "" if v.ettr is None else f"ETTR {v.ettr:.0%}, "
        lines.append(
            ("goodput", f"{ettr}productive {human_seconds(v.productive_seconds)}; lost: {lost or 'none'}")
        )
    elif v.ettr is not None:
        lines.append(("ettr", f"{v.ettr:.0%}"))
    if v.ranks is None and v.stragglers:  # a cluster's status names only the flagged ranks
        flagged = ", ".join(
            f"rank {r.rank} on {r.node}" + _cell(r.straggler_score, " (score {:.1f})") for r in v.stragglers
        )
        lines.append(("stragglers", flagged))
    if v.excluded_nodes:
        lines.append(("excluded", ", ".join(v.excluded_nodes)))
    if (ip := v.in_place) is not None:
        if "error" in ip:
            lines.append(("in-place", str(ip["error"])))
        else:
            committed = ip.get("committed_step")
            spares = ", ".join(f"{s['name']} ({s['state']})" for s in ip.get("spares", [])) or "none"
            lines.append(
                (
                    "in-place",
                    f"round {ip.get('round')}, snapshot "
                    + ("none committed yet" if committed is None else f"step {committed} committed")
                    + f"; spares: {spares}",
                )
            )
    if v.run_dir:
        lines.append(("run dir", v.run_dir))
    return lines


def _node_table(ranks: tuple[RankView, ...]) -> Table:
    """A large job's nodes, the ones worth a look first (controller.views.node_summaries),
    STATUS_TABLE_MAX_NODES of them and a line on the rest."""
    from controller.views import node_summaries  # the store's libraries: not at `vlctl --help`

    nodes = node_summaries(ranks)
    shown, rest = nodes[:STATUS_TABLE_MAX_NODES], nodes[STATUS_TABLE_MAX_NODES:]
    caption = f"{len(rest)} more nodes" if rest else None
    t = Table(box=box.SIMPLE_HEAD, caption=caption)
    for column in ("node", "ranks", "steps", "own s median", "own s max", "flagged"):
        t.add_column(column, no_wrap=True, justify="left" if column == "node" else "right")
    for n in shown:
        t.add_row(
            n.node or "(unknown)",
            str(n.ranks),
            _span([s for s in (n.first_step, n.last_step) if s is not None]),
            _cell(n.own_work_median_s, "{:.3f}"),
            _cell(n.own_work_max_s, "{:.3f}"),
            str(n.flagged) if n.flagged else "",
        )
    return t


def _rank_table(ranks: tuple[RankView, ...], *, every_rank: bool = False) -> Table:
    """Every rank, or for a large job the ranks worth a look (flagged, then the furthest behind, then the slowest
    own work) and a line on the rest: at 16,384 ranks the table still fits a terminal."""
    if len(ranks) <= STATUS_TABLE_MAX_RANKS or every_rank:
        shown, caption = sorted(ranks, key=lambda r: r.rank), None
    else:
        from controller.views import ranks_worth_a_look

        shown = ranks_worth_a_look(ranks, STATUS_TABLE_MAX_RANKS)
        caption = (
            f"flagged, furthest behind and slowest first; {_rest_of(ranks, shown)}; --ranks all lists all"
        )

    t = Table(box=box.SIMPLE_HEAD, caption=caption)
    # Short headers: nine columns fit 80 characters (what rich assumes when stdout is no terminal).
    for column in ("rank", "node", "pid", "step", "last step", "own s", "step s", "score", "flag"):
        t.add_column(column, no_wrap=True, justify="left" if column in ("node", "flag") else "right")
    now = datetime.now(UTC)
    for r in shown:
        t.add_row(
            str(r.rank),
            r.node,
            _cell(r.pid),
            _cell(r.step),
            "" if r.last_progress is None else f"{_ago(r.last_progress, now)} ago",
            _cell(r.own_work_s, "{:.3f}"),
            _cell(r.step_s, "{:.3f}"),
            _cell(r.straggler_score, "{:.1f}"),
            "yes" if r.flagged else "",
        )
    return t


def _rest_of(ranks: tuple[RankView, ...], shown: list[RankView]) -> str:
    """One line on the ranks a large job's table leaves out: how many, on how many nodes, their steps and own
    work."""
    seen = {r.rank for r in shown}
    rest = [r for r in ranks if r.rank not in seen]
    steps = [r.step for r in rest if r.step is not None]
    own = sorted(r.own_work_s for r in rest if r.own_work_s is not None)
    parts = [f"{len(rest)} more ranks on {len({r.node for r in rest})} nodes"]
    if steps:
        parts.append(("step " if min(steps) == max(steps) else "steps ") + _span(steps))
    if own:
        parts.append(f"own work median {own[len(own) // 2]:.3f} s, max {own[-1]:.3f} s")
    return ", ".join(parts)


def _span(steps: list[int]) -> str:
    """Steps as a range: "97-100", "100" when they are all one, "" when there are none."""
    if not steps:
        return ""
    low, high = min(steps), max(steps)
    return str(low) if low == high else f"{low}-{high}"


def _ago(value: datetime, now: datetime) -> str:
    when = value if value.tzinfo else value.replace(tzinfo=UTC)
    return human_seconds(max(0.0, (now - when).total_seconds()))


def _conditions_table(conditions: tuple[Any, ...]) -> Table:
    now = datetime.now(UTC)
    t = Table(box=box.SIMPLE_HEAD)
    for column in ("condition", "status", "reason", "since", "message"):
        t.add_column(column, no_wrap=column != "message")
    for c in conditions:
        since = c.get("lastTransitionTime")
        age = _age(datetime.fromisoformat(since), now) if since else ""
        t.add_row(
            c.get("type"), c.get("status"), c.get("reason"), age and f"{age} ago", Text(c.get("message", ""))
        )
    return t


def status_renderable(v: JobView, *, every_rank: bool = False) -> Group:
    """What `vlctl status` prints: the header lines, then the cluster's conditions or the store's ranks (a large
    job: its nodes first, then the ranks worth a look; every_rank: every rank, in order)."""
    lines = _status_lines(v)
    width = max(len(k) for k, _ in lines)
    parts: list[Any] = [Text("\n".join(f"{k:<{width}}  {value}" for k, value in lines))]
    if v.cluster is not None and v.cluster.conditions:
        parts.append(_conditions_table(v.cluster.conditions))
    if v.ranks and len(v.ranks) > STATUS_TABLE_MAX_RANKS and not every_rank:
        parts.append(_node_table(v.ranks))
    if v.ranks:
        parts.append(_rank_table(v.ranks, every_rank=every_rank))
    return Group(*parts)


def _events_table(rows: list[dict[str, Any]]) -> Table:
    t = Table()
    for column in ("time", "type", "reason", "message"):
        t.add_column(column)
    for r in rows:
        count = f" (x{r['count']})" if r.get("count", 1) > 1 else ""
        t.add_row((r["time"] or "")[:19], r["type"], r["reason"], Text(f"{r['message'] or ''}{count}"))
    return t


# ------------------------------------------------------------------------------------------------ commands


def submit(
    file: Annotated[
        Path, typer.Argument(help="a job spec (YAML or JSON); with a cluster also a TrainingJob object")
    ],
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Validate a job spec and queue the job (pending) for the controller; with --backend kubernetes, create its
    TrainingJob in the cluster (the spec's own `backend:` never chooses)."""
    answer = jobs_client(backend, context, namespace).submit(file)
    emit(answer.data, output, lambda _: answer.text)


def list_(
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Jobs with their phase, step, attempt, restarts, newest checkpoint and ETTR (a cluster's: its
    TrainingJobs)."""
    views = jobs_client(backend, context, namespace).list_jobs()
    emit([v.as_dict(ranks=False) for v in views], output, lambda _: list_table(views))


class RankListing(StrEnum):
    summary = "summary"
    all = "all"


def status(
    job: JobArgument,
    ranks: Annotated[
        RankListing,
        typer.Option(
            "--ranks",
            help="the table's ranks: summary (a large job's nodes and the ranks worth a look) or all; "
            "--output json always lists all",
        ),
    ] = RankListing.summary,
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """One job's state: progress, ETA, checkpoint, goodput, the current attempt and every rank (a cluster's:
    its TrainingJob's status and conditions)."""
    view = jobs_client(backend, context, namespace).status(job)
    emit(view.as_dict(), output, lambda _: status_renderable(view, every_rank=ranks is RankListing.all))


def events(
    job: JobArgument,
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """The job's timeline, oldest first (a cluster's: the Events on its TrainingJob)."""
    emit(jobs_client(backend, context, namespace).events(job), output, _events_table)


def cancel(
    job: JobArgument,
    yes: YesOption = False,
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Cancel a job: the controller stops its ranks; the job ends as cancelled. In a cluster: delete its
    TrainingJob, whose pods the operator stops."""
    answer = jobs_client(backend, context, namespace).cancel(job, yes)
    emit(answer.data, output, lambda _: answer.text)


def logs(
    job: JobArgument,
    rank: Annotated[int | None, typer.Option("--rank", "-r", min=0, help="this rank's log alone")] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="this node agent's log (torchrun's output)")
    ] = None,
    attempt: Annotated[
        int | None,
        typer.Option("--attempt", "-a", min=1, help="this attempt's logs (default: the current one)"),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="print new lines until the job ends")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="how many last lines per log")] = 20,
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceLongOption = None,
) -> None:
    """The last lines of the job's logs, each line prefixed with its rank unless --rank picks one. In a cluster:
    its pods' logs, one per node (--node: a node index or Kubernetes node name; --rank: that rank's lines)."""
    request = LogRequest(rank=rank, node=node, attempt=attempt, follow=follow, lines=lines, output=output)
    jobs_client(backend, context, namespace).logs(job, request)


def _check_resume(session: Session, job: Job, from_step: int | None) -> str:
    """Raise the one-line error when `resume` cannot apply to `job` as it is now; else say what it will do."""
    from controller import states
    from controller.domain.phases import Phase
    from controller.store.records import list_checkpoints

    phase = job.phase
    if phase is Phase.SUCCEEDED:
        raise CliError(f"resume: job {job.name!r} succeeded; there is nothing to resume", EXIT_USER_ERROR)
    if phase not in states.REOPENABLE_FROM and from_step is None:
        raise CliError(
            f"resume: job {job.name!r} is {phase}, not failed or cancelled; pass --from-step N to choose the "
            "checkpoint its next launch resumes from",
            EXIT_USER_ERROR,
        )
    if from_step is not None:
        # The controller also refuses committed checkpoints known to be corrupt (verified False).
        steps = [
            c.step
            for c in list_checkpoints(session=session, job_id=job.id)
            if c.committed and c.verified is not False
        ]
        if from_step not in steps:
            available = ", ".join(map(str, steps)) or "none"
            raise CliError(
                f"--from-step: job {job.name!r} has no committed, valid checkpoint at step {from_step} "
                f"(available: {available})",
                EXIT_USER_ERROR,
            )
    where = f"the checkpoint at step {from_step}" if from_step is not None else "its newest valid checkpoint"
    if phase in states.REOPENABLE_FROM:
        return f"job {job.name} ({phase}) restarts from {where}"
    if phase in (Phase.LAUNCHING, Phase.RUNNING):
        return (
            f"job {job.name} is {phase}: the running attempt goes on; its next restart resumes from {where} "
            f"(`vlctl cancel` then `vlctl resume --from-step {from_step}` restarts it now)"
        )
    return f"job {job.name} is {phase}: its next launch starts from {where}"


def resume(
    job: JobArgument,
    from_step: Annotated[
        int | None,
        typer.Option("--from-step", min=0, help="resume from the committed checkpoint at this step"),
    ] = None,
    yes: YesOption = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Restart a failed or cancelled job from its newest valid checkpoint (or --from-step's); for a job that is
    still going, choose the checkpoint its next launch resumes from."""
    from controller import states
    from controller.domain.phases import EventType
    from controller.store.repo import append_event, lock_job
    from controller.views import read_job_view

    from .store import load_job, store

    with store() as db:
        with db.read() as session:  # check first, so nobody is asked to confirm something impossible
            plan = _check_resume(session, load_job(session, job), from_step)
        confirm("resume", f"{plan}: go ahead?", yes)
        with db.transaction() as session:
            # Under the row lock: the controller may have moved the job on while we asked.
            found = lock_job(session=session, job=load_job(session, job))
            plan = _check_resume(session, found, from_step)
            if found.phase in states.REOPENABLE_FROM:
                states.reopen(found, session=session, from_step=from_step)
            else:
                found.resume_from_step = from_step
                append_event(
                    session=session,
                    job=found,
                    type=EventType.DECISION,
                    reason=states.REASON_RESUME_REQUESTED,
                    message=f"the next launch resumes from the checkpoint at step {from_step} (from the CLI)",
                    data={"from_step": from_step},
                    attempt=found.current_attempt or None,
                )
            session.flush()
            data = read_job_view(session, found).as_dict(ranks=False)
    stderr.print(plan, markup=False, highlight=False)
    emit(data, output, lambda d: f"{d['name']}: {d['phase']}")


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command(name="list")(list_)
    app.command()(status)
    app.command()(events)
    app.command()(logs)
    app.command()(cancel)
    app.command()(resume)
