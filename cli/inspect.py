"""`vlctl checkpoints | stragglers`: what a job left in the store, for reading (`vlctl logs` is in cli/jobs.py,
written once for both backends).

The store's modules are imported inside the commands: this module is imported to print `vlctl --help`.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .options import JobArgument, OutputOption
from .output import OutputFormat, emit, human_seconds, stderr

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from controller.views import JobView

# ----------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_state(committed: bool, verified: bool | None) -> str:
    if not committed:
        return "writing"  # or abandoned by a crash mid-save: never resumed from
    return "committed" if verified is None else "verified" if verified else "CORRUPT"


def checkpoints(job: JobArgument, output: OutputOption = OutputFormat.table) -> None:
    """The job's checkpoints, oldest first, marking the one its next launch resumes from."""
    from controller.store.records import list_checkpoints
    from controller.views import checkpoint_dict

    from .store import load_job, store

    with store() as db, db.read() as session:
        found = load_job(session, job)
        # An explicit `resume --from-step` wins over the newest valid checkpoint, as in the controller.
        resume_step = found.last_checkpoint_step if found.resume_from_step is None else found.resume_from_step
        rows = [
            checkpoint_dict(c, resume_step=resume_step)
            for c in list_checkpoints(session=session, job_id=found.id)
        ]
    if not rows and output is OutputFormat.table:
        stderr.print(f"job {job} has no checkpoints yet", markup=False, highlight=False)
        return

    def table(rows: list[dict[str, Any]]) -> Table:
        t = Table(box=box.SIMPLE_HEAD)
        for column in ("step", "state", "size", "save", "committed at", "attempt", "next"):
            t.add_column(column, no_wrap=True)
        t.add_column("uri", overflow="fold", min_width=24)
        for r in rows:
            t.add_row(
                str(r["step"]),
                _checkpoint_state(r["committed"], r["verified"]),
                r["size"] or "",
                human_seconds(r["save_seconds"]),
                (r["committed_at"] or "")[:19].replace("T", " "),
                "" if r["attempt"] is None else str(r["attempt"]),
                "<-" if r["resume_next"] else "",
                Text(r["uri"]),
            )
        return t

    emit(rows, output, table)


# ------------------------------------------------------------------------------------------------ stragglers


def _flagged_ranks(view: JobView) -> list[dict[str, Any]]:
    """The current attempt's flagged ranks, each against the median own work of every other rank."""
    rows = [r for r in view.ranks or () if r.attempt == view.attempt]
    own = {r.rank: r.own_work_s for r in rows if r.own_work_s is not None}
    flagged = []
    for r in rows:
        if not r.flagged:
            continue
        others = [s for rank, s in own.items() if rank != r.rank]
        median = statistics.median(others) if others else None
        flagged.append(
            {
                "rank": r.rank,
                "node": r.node,
                "attempt": r.attempt,
                "step": r.step,
                "score": r.straggler_score,
                "own_work_s": r.own_work_s,
                "others_median_own_work_s": median,
                "slowdown": r.own_work_s / median if r.own_work_s is not None and median else None,
            }
        )
    return flagged


def _straggler_events(session: Session, job_id: int) -> list[dict[str, Any]]:
    from sqlalchemy import and_, or_, select

    from controller.domain.phases import EventType, SupervisionReason
    from controller.store.models import Event
    from controller.store.records import NODE_EXCLUDED
    from controller.views import event_dict

    stmt = (
        select(Event)
        .where(
            Event.job_id == job_id,
            or_(
                Event.type == EventType.STRAGGLER,
                and_(Event.type == EventType.DECISION, Event.reason == SupervisionReason.EXCLUDE_DECISION),
                and_(Event.type == EventType.NODE_HEALTH, Event.reason == NODE_EXCLUDED),
            ),
        )
        .order_by(Event.seq)
    )
    return [event_dict(e) for e in session.scalars(stmt)]


def _render_stragglers(d: dict[str, Any]) -> Group:
    parts: list[Any] = []
    if d["flagged"]:
        t = Table(title="flagged now", box=box.SIMPLE_HEAD)
        for column in ("rank", "node", "score", "own work", "others' median", "slowdown", "step"):
            t.add_column(column)
        for r in d["flagged"]:
            t.add_row(
                str(r["rank"]),
                r["node"],
                "" if r["score"] is None else f"{r['score']:.1f}",
                "" if r["own_work_s"] is None else f"{r['own_work_s']:.3f} s",
                "" if r["others_median_own_work_s"] is None else f"{r['others_median_own_work_s']:.3f} s",
                "" if r["slowdown"] is None else f"{r['slowdown']:.2f}x",
                "" if r["step"] is None else str(r["step"]),
            )
        parts.append(t)
    else:
        parts.append(Text("no rank is flagged now"))
    if d["events"]:
        t = Table(title="history", box=box.SIMPLE_HEAD)
        for column in ("time", "attempt", "reason", "message"):
            t.add_column(column)
        for e in d["events"]:
            attempt = "" if e["attempt"] is None else str(e["attempt"])
            t.add_row(e["time"][:19], attempt, e["reason"], Text(e["message"]))
        parts.append(t)
    parts.append(Text(f"excluded nodes: {', '.join(d['excluded_nodes']) or 'none'}"))
    return Group(*parts)


def stragglers(job: JobArgument, output: OutputOption = OutputFormat.table) -> None:
    """Ranks flagged as stragglers now, the history of straggler reports and node exclusions, excluded nodes."""
    from controller.views import read_job_view

    from .store import load_job, store

    with store() as db, db.read() as session:
        found = load_job(session, job)
        view = read_job_view(session, found)
        data = {
            "flagged": _flagged_ranks(view),
            "events": _straggler_events(session, found.id),
            "excluded_nodes": list(view.excluded_nodes),
        }
    emit(data, output, _render_stragglers)


def register(app: typer.Typer) -> None:
    app.command()(checkpoints)
    app.command()(stragglers)
