"""`vlctl submit | list | status | events | cancel`: jobs in the controller's store.

Every command opens the store named by VLCTL_DATABASE_URL (SQLite in the user's data folder by default) and
brings its schema up to date. A spec is validated completely before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from controller.domain import states
from controller.spec import SpecError, load_spec
from controller.store import migrate
from controller.store.repo import (
    JobExists,
    JobNotFound,
    create_job,
    get_job,
    list_events,
    list_jobs_with_latest_attempt,
)
from controller.store.session import Store, StoreConfig, StoreUnavailable, open_store

from .errors import EXIT_USER_ERROR, CliError
from .output import OutputFormat, emit, stderr

EXIT_UNAVAILABLE = 3  # the database cannot be reached

OutputOption = Annotated[
    OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts")
]


@contextmanager
def store() -> Iterator[Store]:
    try:
        opened = open_store(StoreConfig())
    except StoreUnavailable as err:
        raise CliError(str(err), EXIT_UNAVAILABLE) from None
    try:
        migrate.upgrade(opened)
        yield opened
    finally:
        opened.dispose()


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


def submit(
    file: Annotated[Path, typer.Argument(help="a TrainingJob spec (YAML or JSON)")],
    output: OutputOption = OutputFormat.table,
) -> None:
    """Validate a job spec and queue the job (pending) for the controller."""
    try:
        spec = load_spec(file)
    except SpecError as err:
        raise CliError(str(err), EXIT_USER_ERROR) from None
    with store() as db, db.transaction() as session:
        try:
            job = create_job(session=session, name=spec.name, spec=spec.model_dump(mode="json"))
        except JobExists as err:
            raise CliError(str(err), EXIT_USER_ERROR) from None
        data = _job_dict(job)
    emit(data, output, lambda d: f"submitted {d['name']} ({d['phase']})")


def list_(output: OutputOption = OutputFormat.table) -> None:
    """Jobs with their phase, attempt, restarts, newest checkpoint and ETTR."""
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
    job: Annotated[str, typer.Argument(help="the job's name")], output: OutputOption = OutputFormat.table
):
    """One job's state."""
    with store() as db, db.read() as session:
        try:
            data = _job_dict(get_job(session=session, name=job))
        except JobNotFound as err:
            raise CliError(str(err).strip('"'), EXIT_USER_ERROR) from None
    emit(data, output, lambda d: "\n".join(f"{k}: {'' if v is None else v}" for k, v in d.items()))


def events(
    job: Annotated[str, typer.Argument(help="the job's name")], output: OutputOption = OutputFormat.table
):
    """The job's timeline, oldest first."""
    with store() as db, db.read() as session:
        try:
            found = get_job(session=session, name=job)
        except JobNotFound as err:
            raise CliError(str(err).strip('"'), EXIT_USER_ERROR) from None
        rows = [
            {
                "seq": e.seq,
                "time": e.time.isoformat(),
                "attempt": e.attempt,
                "type": e.type,
                "reason": e.reason,
                "message": e.message,
                "data": e.data,
            }
            for e in list_events(session=session, job_id=found.id)
        ]

    def table(rows: list[dict]) -> Table:
        t = Table()
        for column in ("seq", "time", "type", "reason", "message"):
            t.add_column(column)
        for r in rows:
            t.add_row(str(r["seq"]), r["time"][:19], r["type"], r["reason"], r["message"])
        return t

    emit(rows, output, table)


def cancel(
    job: Annotated[str, typer.Argument(help="the job's name")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    output: OutputOption = OutputFormat.table,
) -> None:
    """Cancel a job: the controller stops its ranks; the job ends as cancelled."""
    if not yes:
        if not typer.get_text_stream("stdin").isatty():
            raise CliError("cancel: pass --yes when not running interactively", EXIT_USER_ERROR)
        typer.confirm(f"cancel job {job}?", abort=True)
    with store() as db, db.transaction() as session:
        try:
            found = get_job(session=session, name=job)
            states.cancel(found, session=session, message="cancelled from the CLI")
        except JobNotFound as err:
            raise CliError(str(err).strip('"'), EXIT_USER_ERROR) from None
        except states.InvalidTransition as err:
            raise CliError(f"cancel: {err}", EXIT_USER_ERROR) from None
        data = _job_dict(found)
    stderr.print(f"cancelled {job}", highlight=False)
    emit(data, output, lambda d: f"{d['name']}: {d['phase']}")


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command(name="list")(list_)
    app.command()(status)
    app.command()(events)
    app.command()(cancel)
