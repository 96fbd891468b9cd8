"""`vlctl submit | list | status | events | cancel | resume`: jobs in the controller's store.

Every command opens the store named by VLCTL_DATABASE_URL (SQLite in the user's data folder by default) and
brings its schema up to date. A spec is validated completely before anything is written: its fields, then (local
backend) its local inputs, with relative paths taken from the current directory and stored absolute, and the
memory its ranks need (`load_submitted_spec`). With a cluster (`--backend kubernetes`, `--context`, or
VLCTL_BACKEND=kubernetes) all but `resume` go to its TrainingJobs instead (cli/cluster.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import states
from controller.domain.phases import ACTIVE_PHASES, EventType, Phase
from controller.spec import SpecError, TrainingJobSpec, load_spec, prepare_submission
from controller.store import migrate
from controller.store.models import Checkpoint, Event, Job, RankStatus, utcnow
from controller.store.records import excluded_nodes, list_checkpoints
from controller.store.repo import (
    JobExists,
    JobNotFound,
    append_event,
    create_job,
    get_current_attempt,
    get_job,
    list_events,
    list_jobs_with_latest_attempt,
    lock_job,
)
from controller.store.session import Store, StoreConfig, StoreUnavailable, open_store

from . import cluster
from .cluster import BackendOption, ContextOption, NamespaceOption
from .errors import EXIT_UNAVAILABLE, EXIT_USER_ERROR, CliError
from .output import OutputFormat, emit, human_count, stderr

STATUS_TABLE_MAX_RANKS = 32  # the table shows flagged ranks first, up to this many; JSON lists every rank

OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts")
]
JobArgument = Annotated[str, typer.Argument(help="the job's name")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


@contextmanager
def store() -> Iterator[Store]:
    try:
        opened = open_store(StoreConfig())
    except StoreUnavailable as err:
        raise CliError(str(err), EXIT_UNAVAILABLE) from None
    try:
        migrate.upgrade(opened)
        yield opened
    except StoreUnavailable as err:  # the server went away mid-command (e.g. during `logs --follow`)
        raise CliError(str(err), EXIT_UNAVAILABLE) from None
    finally:
        opened.dispose()


def load_job(session: Session, name: str) -> Job:
    """The job named `name`, or the one-line "no job named ..." error (exit 2)."""
    try:
        return get_job(session=session, name=name)
    except JobNotFound as err:
        raise CliError(str(err).strip('"'), EXIT_USER_ERROR) from None


def confirm(command: str, question: str, yes: bool) -> None:
    """Ask before a destructive change; without a terminal, only `--yes` may go ahead."""
    if yes:
        return
    if not typer.get_text_stream("stdin").isatty():
        raise CliError(f"{command}: pass --yes when not running interactively", EXIT_USER_ERROR)
    typer.confirm(question, abort=True)


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _job_dict(job: Any, attempt: Any = None) -> dict[str, Any]:
    return {
        "name": job.name,
        "phase": str(job.phase),
        "reason": job.phase_reason,
        "message": job.phase_message,
        "attempt": job.current_attempt,
        "restarts": job.num_restarts,
        "restarts_counted": job.num_restarts_counted,
        "last_checkpoint_step": job.last_checkpoint_step,
        "last_checkpoint_uri": job.last_checkpoint_uri,
        "ettr": job.ettr,
        "created": job.created_at.isoformat(),
        "updated": job.updated_at.isoformat(),
        "backend": job.spec.get("backend"),
        "attempt_started": attempt.started_at.isoformat()
        if attempt is not None and attempt.started_at
        else None,
    }


def event_dict(e: Event) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "time": e.time.isoformat(),
        "attempt": e.attempt,
        "type": e.type,
        "reason": e.reason,
        "message": e.message,
        "data": e.data,
    }


def _rank_dicts(session: Session, job_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(select(RankStatus).where(RankStatus.job_id == job_id).order_by(RankStatus.rank))
    return [
        {
            "rank": r.rank,
            "attempt": r.attempt,
            "node": r.node,
            "pid": r.pid,
            "step": r.step,
            "last_progress": iso(r.last_progress_at),
            "own_work_s": r.own_work_s,
            "step_s": r.step_s,
            "loss": r.loss,
            "straggler_score": r.straggler_score,
            "flagged": r.flagged,
            "updated": iso(r.updated_at),
        }
        for r in rows
    ]


def _eta_seconds(job: Job, ranks: list[dict[str, Any]]) -> float | None:
    """Remaining steps times the ranks' median step time; only while the job is still going."""
    step_times = [r["step_s"] for r in ranks if r["step_s"] is not None]
    if job.phase not in ACTIVE_PHASES or not step_times or job.total_steps is None:
        return None
    return max(0, job.total_steps - (job.current_step or 0)) * statistics.median(step_times)


def status_dict(session: Session, job: Job) -> dict[str, Any]:
    """What `status` shows: the `list` row plus progress, goodput, the current attempt and every rank."""
    attempt = get_current_attempt(session=session, job=job)
    ranks = _rank_dicts(session, job.id)
    last_checkpoint = None
    if job.last_checkpoint_step is not None:
        committed_at = session.scalar(
            select(Checkpoint.committed_at).where(
                Checkpoint.job_id == job.id, Checkpoint.step == job.last_checkpoint_step
            )
        )
        last_checkpoint = {
            "step": job.last_checkpoint_step,
            "uri": job.last_checkpoint_uri,
            "committed_at": iso(committed_at),
        }
    progress = None
    if job.current_step is not None and job.total_steps:
        progress = min(1.0, job.current_step / job.total_steps)
    return {
        **_job_dict(job, attempt),
        "finished": iso(job.finished_at),
        "step": job.current_step,
        "total_steps": job.total_steps,
        "progress": progress,
        "loss": job.loss,
        "tokens_per_second": job.tokens_per_second,
        "eta_seconds": _eta_seconds(job, ranks),
        "progress_at": iso(job.progress_at),
        "checkpoint_interval_steps": job.checkpoint_interval_steps,
        "last_checkpoint": last_checkpoint,
        "resume_from_step": job.resume_from_step,
        "next_attempt_at": iso(job.next_attempt_at),
        "run_dir": job.run_dir,
        "productive_seconds": job.productive_seconds,
        "lost_seconds": dict(job.lost_seconds or {}),
        "excluded_nodes": sorted(excluded_nodes(session=session, job_id=job.id)),
        "current_attempt": None
        if attempt is None
        else {
            "number": attempt.number,
            "nodes": list(attempt.nodes),
            "started": iso(attempt.started_at),
            "running": iso(attempt.running_at),
            "ended": iso(attempt.ended_at),
            "exit_class": attempt.exit_class,
            "resumed_from_step": attempt.resumed_from_step,
        },
        "ranks": ranks,
    }


def _status_header(d: dict[str, Any]) -> Text:
    lines = [
        ("job", f"{d['name']}  {d['phase']} ({d['reason']}){': ' + d['message'] if d['message'] else ''}")
    ]
    a = d["current_attempt"]
    if a is not None:
        resumed = (
            f", resumed from step {a['resumed_from_step']}" if a["resumed_from_step"] is not None else ""
        )
        ended = f", ended {a['ended'][:19]} ({a['exit_class']})" if a["ended"] else ""
        lines.append(
            (
                "attempt",
                f"{a['number']} on {', '.join(a['nodes'])}, started {a['started'][:19]}{resumed}{ended}",
            )
        )
    lines.append(("restarts", f"{d['restarts']} ({d['restarts_counted']} counted toward the limit)"))
    if d["step"] is not None:
        parts = [f"step {d['step']}" + (f" / {d['total_steps']}" if d["total_steps"] else "")]
        if d["progress"] is not None:
            parts[0] += f" ({d['progress']:.1%})"
        if d["loss"] is not None:
            parts.append(f"loss {d['loss']:.4f}")
        if d["tokens_per_second"] is not None:
            parts.append(f"{human_count(int(d['tokens_per_second']))} tokens/s")
        if d["eta_seconds"] is not None:
            parts.append(f"ETA {human_seconds(d['eta_seconds'])}")
        if d["progress_at"]:
            parts.append(f"last step at {d['progress_at'][:19]}")
        lines.append(("progress", ", ".join(parts)))
    ckpt = d["last_checkpoint"]
    every = f", every {d['checkpoint_interval_steps']} steps" if d["checkpoint_interval_steps"] else ""
    if ckpt is not None:
        lines.append(("checkpoint", f"step {ckpt['step']} at {ckpt['uri']}{every}"))
    elif every:
        lines.append(("checkpoint", f"none yet{every}"))
    if d["resume_from_step"] is not None:
        lines.append(("resume", f"the next launch resumes from step {d['resume_from_step']}"))
    lost = ", ".join(f"{cause} {human_seconds(s)}" for cause, s in d["lost_seconds"].items() if s)
    ettr = "" if d["ettr"] is None else f"ETTR {d['ettr']:.0%}, "
    lines.append(
        ("goodput", f"{ettr}productive {human_seconds(d['productive_seconds'])}; lost: {lost or 'none'}")
    )
    if d["excluded_nodes"]:
        lines.append(("excluded", ", ".join(d["excluded_nodes"])))
    if d["run_dir"]:
        lines.append(("run dir", d["run_dir"]))
    width = max(len(k) for k, _ in lines)
    return Text("\n".join(f"{k:<{width}}  {v}" for k, v in lines))


def _ago(value: str | None, now: datetime) -> str:
    if value is None:
        return ""
    seconds = (now - datetime.fromisoformat(value)).total_seconds()
    return f"{human_seconds(max(0.0, seconds))} ago"


def _rank_table(ranks: list[dict[str, Any]]) -> Table:
    shown = sorted(
        sorted(ranks, key=lambda r: (not r["flagged"], r["rank"]))[:STATUS_TABLE_MAX_RANKS],
        key=lambda r: r["rank"],
    )
    hidden = len(ranks) - len(shown)
    t = Table(
        box=box.SIMPLE_HEAD, caption=f"{hidden} more ranks: --output json lists all" if hidden else None
    )
    # Short headers: nine columns fit 80 characters (what rich assumes when stdout is no terminal).
    for column in ("rank", "node", "pid", "step", "last step", "own s", "step s", "score", "flag"):
        t.add_column(column, no_wrap=True, justify="left" if column in ("node", "flag") else "right")
    now = utcnow()
    for r in shown:
        t.add_row(
            str(r["rank"]),
            r["node"],
            "" if r["pid"] is None else str(r["pid"]),
            "" if r["step"] is None else str(r["step"]),
            _ago(r["last_progress"], now),
            "" if r["own_work_s"] is None else f"{r['own_work_s']:.3f}",
            "" if r["step_s"] is None else f"{r['step_s']:.3f}",
            "" if r["straggler_score"] is None else f"{r['straggler_score']:.1f}",
            "yes" if r["flagged"] else "",
        )
    return t


def _render_status(d: dict[str, Any]) -> Group:
    parts: list[Any] = [_status_header(d)]
    if d["ranks"]:
        parts.append(_rank_table(d["ranks"]))
    return Group(*parts)


def load_submitted_spec(file: Path) -> TrainingJobSpec:
    """The spec in `file` as `submit` and `run` store it: validated, its relative local paths made absolute
    against the current directory (where the user typed the command), its inputs found and its ranks' memory
    checked (controller.spec.prepare_submission); any problem is one line naming the field, exit 2."""
    try:
        return prepare_submission(load_spec(file), base_dir=Path.cwd(), source=str(file))
    except SpecError as err:
        raise CliError(str(err), EXIT_USER_ERROR) from None


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
    if (where := cluster.target(backend, context, namespace)) is not None:
        return cluster.submit(where, file, output)
    spec = load_submitted_spec(file)
    with store() as db, db.transaction() as session:
        try:
            job = create_job(session=session, name=spec.name, spec=spec.model_dump(mode="json"))
        except JobExists as err:
            raise CliError(str(err), EXIT_USER_ERROR) from None
        data = _job_dict(job)
    emit(data, output, lambda d: f"submitted {d['name']} ({d['phase']})")


def list_(
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """Jobs with their phase, attempt, restarts, newest checkpoint and ETTR (a cluster's: its TrainingJobs)."""
    if (where := cluster.target(backend, context, namespace)) is not None:
        return cluster.list_jobs(where, output)
    with store() as db, db.read() as session:
        rows = [_job_dict(job, attempt) for job, attempt in list_jobs_with_latest_attempt(session=session)]

    def table(rows: list[dict]) -> Table:
        t = Table()
        for column in ("name", "phase", "attempt", "restarts", "checkpoint", "ettr", "created"):
            t.add_column(column)
        for r in rows:
            ettr = "" if r["ettr"] is None else f"{r['ettr']:.0%}"
            step = "" if r["last_checkpoint_step"] is None else str(r["last_checkpoint_step"])
            t.add_row(
                r["name"], r["phase"], str(r["attempt"]), str(r["restarts"]), step, ettr, r["created"][:19]
            )
        return t

    emit(rows, output, table)


def status(
    job: JobArgument,
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """One job's state: progress, ETA, checkpoint, goodput, the current attempt and every rank (a cluster's:
    its TrainingJob's status and conditions)."""
    if (where := cluster.target(backend, context, namespace)) is not None:
        return cluster.status(where, job, output)
    with store() as db, db.read() as session:
        data = status_dict(session, load_job(session, job))
    emit(data, output, _render_status)


def events(
    job: JobArgument,
    output: OutputOption = OutputFormat.table,
    backend: BackendOption = None,
    context: ContextOption = None,
    namespace: NamespaceOption = None,
) -> None:
    """The job's timeline, oldest first (a cluster's: the Events on its TrainingJob)."""
    if (where := cluster.target(backend, context, namespace)) is not None:
        return cluster.events(where, job, output)
    with store() as db, db.read() as session:
        found = load_job(session, job)
        rows = [event_dict(e) for e in list_events(session=session, job_id=found.id)]

    def table(rows: list[dict]) -> Table:
        t = Table()
        for column in ("seq", "time", "type", "reason", "message"):
            t.add_column(column)
        for r in rows:
            t.add_row(str(r["seq"]), r["time"][:19], r["type"], r["reason"], r["message"])
        return t

    emit(rows, output, table)


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
    if (where := cluster.target(backend, context, namespace)) is not None:
        return cluster.cancel(where, job, yes, output)
    confirm("cancel", f"cancel job {job}?", yes)
    with store() as db, db.transaction() as session:
        found = load_job(session, job)
        # Cancelling twice is not an error (the outcome the user asked for holds); an ended job cannot be.
        already = found.phase is Phase.CANCELLED
        if found.phase in (Phase.SUCCEEDED, Phase.FAILED):
            raise CliError(
                f"cancel: job {job!r} already ended ({found.phase}); there is nothing to cancel",
                EXIT_USER_ERROR,
            )
        if not already:
            states.cancel(found, session=session, message="cancelled from the CLI")
        data = _job_dict(found, get_current_attempt(session=session, job=found))
    stderr.print(f"{job} is already cancelled" if already else f"cancelled {job}", highlight=False)
    emit(data, output, lambda d: f"{d['name']}: {d['phase']}")


def _check_resume(session: Session, job: Job, from_step: int | None) -> str:
    """Raise the one-line error when `resume` cannot apply to `job` as it is now; else say what it will do."""
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
            data = {**_job_dict(found), "resume_from_step": found.resume_from_step}
    stderr.print(plan, markup=False, highlight=False)
    emit(data, output, lambda d: f"{d['name']}: {d['phase']}")


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command(name="list")(list_)
    app.command()(status)
    app.command()(events)
    app.command()(cancel)
    app.command()(resume)
