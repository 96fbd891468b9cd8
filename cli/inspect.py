"""`vlctl logs | checkpoints | stragglers`: what a job left in its run folder and in the store, for reading.

Logs are read from the files the local backend writes (`<run_dir>/logs/attempt-<k>/rank-<r>.log`, and each node
agent's `node-<name>.log`); `--follow` polls them, and the job's phase, until the job ends, so a person can watch
a run from any shell on the machine without the controller's help. With a cluster (`--backend kubernetes`,
`--context`, or VLCTL_BACKEND=kubernetes) `logs` reads the job's pods instead (cli/cluster.py).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from controller.backends.local import log_dir
from controller.domain.phases import TERMINAL_PHASES, EventType, Phase
from controller.store.models import Event, Job, RankStatus
from controller.store.records import NODE_EXCLUDED, excluded_nodes, list_checkpoints
from controller.store.session import Store
from trainer.contract.memory import human_bytes

from . import cluster
from .cluster import BackendOption, ContextOption, NamespaceLongOption
from .errors import EXIT_USER_ERROR, CliError
from .jobs import JobArgument, OutputOption, event_dict, human_seconds, iso, load_job, store
from .output import OutputFormat, emit, stderr

FOLLOW_POLL_SECONDS = 1.0  # how often `logs --follow` looks for new lines and re-reads the job's phase
_TAIL_BLOCK = 64 * 1024
_RANK_LOG = re.compile(r"rank-(\d+)\.log")
_NODE_LOG = re.compile(r"node-(.+)\.log")
_NODE_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9.]*")  # a node name is one path component, never ".."


# ------------------------------------------------------------------------------------------------------ logs


@dataclass(kw_only=True)
class LogFile:
    """One log being read: a rank's (`rank` set) or a node agent's (`node` set)."""

    path: Path
    rank: int | None = None
    node: str | None = None
    offset: int = 0  # bytes already printed
    partial: bytes = field(default=b"", repr=False)  # a last line still being written

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}] " if self.rank is not None else f"[node {self.node}] "

    def tail(self, num_lines: int, *, complete_only: bool) -> list[str]:
        """The last `num_lines` lines, reading backwards in blocks (a rank's log can be gigabytes), and move
        `offset` past them. `complete_only`: leave a last line without its newline for `read_new`."""
        with open(self.path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            data, pos = b"", end
            while pos > 0 and data.count(b"\n") <= num_lines:
                step = min(_TAIL_BLOCK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
        self.offset = end
        if complete_only:
            cut = data.rfind(b"\n") + 1
            self.offset -= len(data) - cut
            data = data[:cut]
        lines = data.decode("utf-8", errors="replace").splitlines()
        return lines[-num_lines:] if num_lines else []

    def read_new(self, *, final: bool = False) -> list[str]:
        """Complete lines appended since the last read; `final` also returns an unfinished last line."""
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:  # truncated or replaced: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        data = self.partial + data
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].decode("utf-8", errors="replace").splitlines()


def _find_logs(folder: Path, *, rank: int | None, node: str | None) -> list[LogFile]:
    """The logs to show, ranks in numeric order: the one asked for, or every rank's (the node agents' when no
    rank has written yet, e.g. a launch that failed before the ranks started)."""
    if rank is not None:
        path = folder / f"rank-{rank}.log"
        return [LogFile(path=path, rank=rank)] if path.is_file() else []
    if node is not None:
        path = folder / f"node-{node}.log"
        return [LogFile(path=path, node=node)] if path.is_file() else []
    names = os.listdir(folder) if folder.is_dir() else []
    ranks = sorted(int(m[1]) for n in names if (m := _RANK_LOG.fullmatch(n)))
    if ranks:
        return [LogFile(path=folder / f"rank-{r}.log", rank=r) for r in ranks]
    return [LogFile(path=folder / n, node=m[1]) for n in sorted(names) if (m := _NODE_LOG.fullmatch(n))]


def _write(lines: list[str], prefix: str) -> None:
    if lines:
        sys.stdout.write("".join(f"{prefix}{line}\n" for line in lines))
        sys.stdout.flush()


def _job_now(db: Store, job_id: int) -> tuple[Phase, int]:
    with db.read() as session:
        row = session.execute(select(Job.phase, Job.current_attempt).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise CliError("logs: the job was deleted while following it", EXIT_USER_ERROR)
    return row[0], row[1]


def _order(f: LogFile) -> tuple[int, int, str]:
    return (0, f.rank, "") if f.rank is not None else (1, 0, f.node or "")


def _follow(
    db: Store,
    job_id: int,
    run_dir: str,
    attempt: int,
    files: list[LogFile],
    *,
    pinned: bool,
    rank: int | None,
    node: str | None,
) -> None:
    """Print new lines until the job reaches a terminal phase. Unless an attempt was pinned (`--attempt`), a
    restart switches to the new attempt's folder. The phase is read before the files, so every line written
    before the job ended is printed."""
    prefixed = rank is None and node is None
    following = {f.path: f for f in files}
    while True:
        phase, current = _job_now(db, job_id)
        done = phase in TERMINAL_PHASES
        switch = not pinned and current != attempt
        for f in _find_logs(log_dir(run_dir, attempt), rank=rank, node=node):
            following.setdefault(f.path, f)  # a rank that started since: from its first line
        for f in sorted(following.values(), key=_order):
            _write(f.read_new(final=done or switch), f.prefix if prefixed else "")
        if switch:
            attempt, following = current, {}
            stderr.print(f"--- attempt {attempt} ---", markup=False, highlight=False)
            continue  # at once, from their first lines, even if the job has ended since: the next pass returns
        if done:
            return
        time.sleep(FOLLOW_POLL_SECONDS)


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
    if (where := cluster.target(backend, context, namespace)) is not None:
        return cluster.logs(
            where, job, rank=rank, node=node, attempt=attempt, follow=follow, lines=lines, output=output
        )
    if follow and output is OutputFormat.json:
        raise CliError("--follow: not with --output json, which prints a single document", EXIT_USER_ERROR)
    if rank is not None and node is not None:
        raise CliError("--rank, --node: give one or the other", EXIT_USER_ERROR)
    if node is not None and not _NODE_NAME.fullmatch(node):
        raise CliError(f"--node: {node!r} is not a node name", EXIT_USER_ERROR)
    with store() as db:
        with db.read() as session:
            found = load_job(session, job)
            job_id, run_dir, current = found.id, found.run_dir, found.current_attempt
        if run_dir is None or current == 0:
            raise CliError(
                f"logs: job {job!r} has never been launched, so it has no logs yet", EXIT_USER_ERROR
            )
        number = current if attempt is None else attempt
        if number > current:
            raise CliError(f"--attempt: job {job!r} has attempts 1 to {current}", EXIT_USER_ERROR)
        folder = log_dir(run_dir, number)
        files = _find_logs(folder, rank=rank, node=node)
        if not files and not follow:
            what = f"rank {rank}" if rank is not None else f"node {node}" if node is not None else "any rank"
            raise CliError(f"logs: no log of {what} for attempt {number} in {folder}", EXIT_USER_ERROR)
        if rank is None and node is None and files and files[0].node is not None:
            stderr.print("no rank has written a log yet; showing the node agents' logs", highlight=False)
        if output is OutputFormat.json:
            data = [
                {
                    "attempt": number,
                    "rank": f.rank,
                    "node": f.node,
                    "path": str(f.path),
                    "lines": f.tail(lines, complete_only=False),
                }
                for f in files
            ]
            emit(data, output, str)
            return
        prefixed = rank is None and node is None
        for f in files:
            _write(f.tail(lines, complete_only=follow), f.prefix if prefixed else "")
        if follow:
            _follow(db, job_id, run_dir, number, files, pinned=attempt is not None, rank=rank, node=node)


# ----------------------------------------------------------------------------------------------- checkpoints


def _checkpoint_state(committed: bool, verified: bool | None) -> str:
    if not committed:
        return "writing"  # or abandoned by a crash mid-save: never resumed from
    return "committed" if verified is None else "verified" if verified else "CORRUPT"


def checkpoints(job: JobArgument, output: OutputOption = OutputFormat.table) -> None:
    """The job's checkpoints, oldest first, marking the one its next launch resumes from."""
    with store() as db, db.read() as session:
        found = load_job(session, job)
        # An explicit `resume --from-step` wins over the newest valid checkpoint, as in the controller.
        resume_step = found.last_checkpoint_step if found.resume_from_step is None else found.resume_from_step
        rows = [
            {
                "step": c.step,
                "uri": c.uri,
                "attempt": c.attempt,
                "committed": c.committed,
                "verified": c.verified,
                "size_bytes": c.size_bytes,
                "size": None if c.size_bytes is None else human_bytes(c.size_bytes),
                "save_seconds": c.save_seconds,
                "created": iso(c.created_at),
                "committed_at": iso(c.committed_at),
                "resume_next": c.step == resume_step,
            }
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


def _flagged_ranks(session: Session, job: Job) -> list[dict[str, Any]]:
    """The current attempt's flagged ranks, each against the median own work of every other rank."""
    rows = list(
        session.scalars(
            select(RankStatus)
            .where(RankStatus.job_id == job.id, RankStatus.attempt == job.current_attempt)
            .order_by(RankStatus.rank)
        )
    )
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
    # Imported here: the loop's module is large and only this command needs its reason constant.
    from controller.reconciler import REASON_EXCLUDE_DECISION

    stmt = (
        select(Event)
        .where(
            Event.job_id == job_id,
            or_(
                Event.type == EventType.STRAGGLER,
                and_(Event.type == EventType.DECISION, Event.reason == REASON_EXCLUDE_DECISION),
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
    with store() as db, db.read() as session:
        found = load_job(session, job)
        data = {
            "flagged": _flagged_ranks(session, found),
            "events": _straggler_events(session, found.id),
            "excluded_nodes": sorted(excluded_nodes(session=session, job_id=found.id)),
        }
    emit(data, output, _render_stragglers)


def register(app: typer.Typer) -> None:
    app.command()(logs)
    app.command()(checkpoints)
    app.command()(stragglers)
