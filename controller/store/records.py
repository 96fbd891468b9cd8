"""What a job leaves behind besides its phase: checkpoints, per-rank step windows, node health, goodput.

Same rules as `repo`: keyword-only session, never commit, set-based queries. Checkpoint and node-health changes
that matter to a person reading the timeline also append an event.

Decisions:
- `jobs.last_checkpoint_*` always names the newest committed checkpoint not known to be corrupt; it is recomputed
  from the checkpoints table (one query) whenever a commit or a failed verification changes the answer, so
  resuming after a corrupt newest checkpoint falls back to the previous one.
- Rank windows are written in bulk (one executemany per report) and pruned to the newest windows per job, keeping
  flagged windows as evidence, so the table stays bounded at 16,384 ranks.
- `rank_status` rows are written by `RankRows`, within a budget of rows a second (see its docstring): what a
  person must see at once (a rank flagged or cleared, a new pid or node, a new attempt) is written the pass it
  changes; the steps and timings of the other ranks are refreshed in turn within the budget, so a job of a
  few hundred ranks gets every row every pass and one of 16,384 a full refresh about once a minute, and the
  store's writes do not grow with the ranks (`bench_controller_scale`, SQLite, 16,384 ranks: 36 ms a pass
  against 1,131 ms for every row every pass through the ORM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from controller.domain.phases import EventType

from .models import Checkpoint, Job, NodeHealth, RankStepWindow
from .repo import append_event
from .tables import rank_status, utcnow

CHECKPOINT_COMMITTED = "CheckpointCommitted"
CHECKPOINT_CORRUPT = "CheckpointCorrupt"
NODE_EXCLUDED = "NodeExcluded"


def record_checkpoint(
    *,
    session: Session,
    job: Job,
    step: int,
    uri: str,
    committed: bool,
    attempt: int | None = None,
    size_bytes: int | None = None,
    save_seconds: float | None = None,
    now: datetime | None = None,
) -> Checkpoint:
    """Record a checkpoint save (upsert by step: a step re-saved after a restart replaces the old row)."""
    now = now or utcnow()
    ckpt = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
    ).first()
    if ckpt is None:
        ckpt = Checkpoint(job_id=job.id, step=step, created_at=now)
        session.add(ckpt)
    # A step found corrupt and saved anew (after a resume from an older one) is a new commit: it gets its event.
    replaces_corrupt = ckpt.committed and ckpt.verified is False
    was_committed = ckpt.committed and not replaces_corrupt
    ckpt.uri, ckpt.attempt, ckpt.committed, ckpt.verified = uri, attempt, committed, None
    ckpt.size_bytes, ckpt.save_seconds = size_bytes, save_seconds
    ckpt.committed_at = now if committed else None
    if committed and not was_committed:
        again = " again, replacing the corrupt one" if replaces_corrupt else ""
        append_event(
            session=session,
            job=job,
            type=EventType.CHECKPOINT,
            reason=CHECKPOINT_COMMITTED,
            message=f"checkpoint at step {step} committed{again} to {uri}",
            data={"step": step, "uri": uri, "size_bytes": size_bytes, "save_seconds": save_seconds},
            attempt=attempt,
            now=now,
        )
    refresh_last_checkpoint(session=session, job=job)
    return ckpt


def record_checkpoint_verification(
    *,
    session: Session,
    job: Job,
    step: int,
    ok: bool,
    detail: str = "",
    attempt: int | None = None,
    now: datetime | None = None,
) -> None:
    """Record whether the checkpoint at `step` matched its manifest; a corrupt one is never resumed from.
    `attempt`: the attempt the check was made for (default: the job's current one)."""
    ckpt = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step)
    ).one()
    ckpt.verified = ok
    if not ok:
        append_event(
            session=session,
            job=job,
            type=EventType.CHECKPOINT,
            reason=CHECKPOINT_CORRUPT,
            message=f"checkpoint at step {step} failed verification: {detail}".rstrip(": "),
            data={"step": step, "uri": ckpt.uri, "saved_by_attempt": ckpt.attempt},
            attempt=attempt if attempt is not None else (job.current_attempt or None),
            now=now,
        )
    refresh_last_checkpoint(session=session, job=job)


def newest_resumable_checkpoint(
    *, session: Session, job_id: int, at_most_step: int | None = None
) -> Checkpoint | None:
    """The newest committed checkpoint not known to be corrupt (at or before `at_most_step` if given)."""
    stmt = (
        select(Checkpoint)
        .where(
            Checkpoint.job_id == job_id,
            Checkpoint.committed,
            or_(Checkpoint.verified.is_(None), Checkpoint.verified),
        )
        .order_by(Checkpoint.step.desc())
        .limit(1)
    )
    if at_most_step is not None:
        stmt = stmt.where(Checkpoint.step <= at_most_step)
    return session.scalars(stmt).first()


def refresh_last_checkpoint(*, session: Session, job: Job) -> None:
    newest = newest_resumable_checkpoint(session=session, job_id=job.id)
    job.last_checkpoint_step = newest.step if newest else None
    job.last_checkpoint_uri = newest.uri if newest else None


def list_checkpoints(*, session: Session, job_id: int) -> list[Checkpoint]:
    return list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )


@dataclass(kw_only=True, slots=True)
class RankWindowStats:
    """One rank's aggregate over a window of steps, as the straggler detector computes it."""

    rank: int
    node: str
    window_start_step: int
    window_end_step: int
    num_steps: int
    mean_own_s: float
    median_own_s: float
    p90_own_s: float
    mean_wall_s: float | None = None  # the detector judges own work only: it records none
    straggler_score: float | None = None
    flagged: bool = False

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank: must be >= 0, got {self.rank}")
        if self.window_end_step < self.window_start_step:
            raise ValueError(f"window_end_step: {self.window_end_step} is before {self.window_start_step}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {self.num_steps}")


def record_rank_windows(
    *,
    session: Session,
    job_id: int,
    attempt: int,
    windows: Sequence[RankWindowStats],
    now: datetime | None = None,
) -> None:
    """Insert one window per rank in a single executemany."""
    if not windows:
        return
    now = now or utcnow()
    rows: list[dict[str, Any]] = [
        {**asdict(w), "job_id": job_id, "attempt": attempt, "recorded_at": now} for w in windows
    ]
    session.execute(insert(RankStepWindow), rows)


def latest_rank_windows(*, session: Session, job_id: int, attempt: int) -> list[RankStepWindow]:
    """Each rank's newest window in `attempt`, ordered by rank, in one query."""
    newest = (
        select(RankStepWindow.rank, func.max(RankStepWindow.window_start_step).label("start"))
        .where(RankStepWindow.job_id == job_id, RankStepWindow.attempt == attempt)
        .group_by(RankStepWindow.rank)
        .subquery()
    )
    stmt = (
        select(RankStepWindow)
        .join(
            newest,
            (RankStepWindow.rank == newest.c.rank) & (RankStepWindow.window_start_step == newest.c.start),
        )
        .where(RankStepWindow.job_id == job_id, RankStepWindow.attempt == attempt)
        .order_by(RankStepWindow.rank)
    )
    return list(session.scalars(stmt))


def prune_rank_windows(*, session: Session, job_id: int, keep_windows: int) -> int:
    """Delete all but the job's newest `keep_windows` window starts (flagged windows stay); returns rows deleted."""
    if keep_windows < 1:
        raise ValueError(f"keep_windows: must be >= 1, got {keep_windows}")
    newest_starts = (
        select(RankStepWindow.window_start_step)
        .where(RankStepWindow.job_id == job_id)
        .distinct()
        .order_by(RankStepWindow.window_start_step.desc())
        .limit(keep_windows)
        .subquery()
    )
    cutoff = session.scalar(select(func.min(newest_starts.c.window_start_step)))
    if cutoff is None:
        return 0
    stmt = delete(RankStepWindow).where(
        RankStepWindow.job_id == job_id,
        RankStepWindow.window_start_step < cutoff,
        RankStepWindow.flagged.is_(False),
    )
    return session.execute(stmt.execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]


def exclude_node(
    *,
    session: Session,
    node: str,
    reason: str,
    message: str = "",
    expires_at: datetime | None = None,
    job: Job | None = None,
    now: datetime | None = None,
) -> NodeHealth:
    """Exclude `node` for `job` (or for every job when None) until `expires_at` (None: until cleared)."""
    scope = NodeHealth.job_id.is_(None) if job is None else NodeHealth.job_id == job.id
    row = session.scalars(select(NodeHealth).where(NodeHealth.node == node, scope)).first()
    if row is None:
        row = NodeHealth(node=node, job_id=job.id if job is not None else None, reason=reason)
        session.add(row)
    row.excluded, row.reason, row.message, row.expires_at = True, reason, message, expires_at
    row.updated_at = now or utcnow()
    if job is not None:
        append_event(
            session=session,
            job=job,
            type=EventType.NODE_HEALTH,
            reason=NODE_EXCLUDED,
            message=f"node {node} excluded ({reason}){': ' + message if message else ''}",
            data={
                "node": node,
                "reason": reason,
                "expires_at": expires_at.isoformat() if expires_at else None,
            },
            now=now,
        )
    return row


def clear_node_exclusion(*, session: Session, node: str, job_id: int | None = None) -> int:
    scope = NodeHealth.job_id.is_(None) if job_id is None else NodeHealth.job_id == job_id
    rows = list(
        session.scalars(select(NodeHealth).where(NodeHealth.node == node, scope, NodeHealth.excluded))
    )
    for row in rows:
        row.excluded = False
    return len(rows)


def excluded_nodes(*, session: Session, job_id: int | None = None, now: datetime | None = None) -> set[str]:
    """Nodes excluded for every job, plus those excluded for `job_id`, whose exclusion has not expired."""
    now = now or utcnow()
    scope = (
        NodeHealth.job_id.is_(None)
        if job_id is None
        else or_(NodeHealth.job_id.is_(None), NodeHealth.job_id == job_id)
    )
    stmt = select(NodeHealth.node).where(
        NodeHealth.excluded, scope, or_(NodeHealth.expires_at.is_(None), NodeHealth.expires_at > now)
    )
    return set(session.scalars(stmt))


def record_goodput(
    *,
    session: Session,
    job: Job,
    productive_seconds: float,
    lost_seconds: dict[str, float],
    ettr: float | None,
) -> None:
    """Store the job's goodput accounting (computed by the controller's goodput module)."""
    if productive_seconds < 0:
        raise ValueError(f"productive_seconds: must be >= 0, got {productive_seconds}")
    if ettr is not None and not 0.0 <= ettr <= 1.0:
        raise ValueError(f"ettr: must be within [0, 1], got {ettr}")
    job.productive_seconds = productive_seconds
    job.lost_seconds = dict(lost_seconds)
    job.ettr = ettr


RANK_ROWS_PER_SECOND = 256  # the refresh budget of one job's rank_status rows (urgent changes are on top)
_COLUMNS = (
    "attempt", "node", "pid", "flagged",  # urgent (`_urgent`): a change is written the pass it is seen
    "step", "last_progress_at", "own_work_s", "step_s", "loss", "straggler_score",
)  # fmt: skip


class RankRows:
    """Writes one attempt's `rank_status` rows within a budget (the module's "rank_status" decision).

    `write` takes every rank's values (`LiveAttempt.rank_rows`: rank, node, pid, step, last_progress, own_work_s,
    step_s, loss, straggler_score, flagged). The first call (a new attempt, or a controller that took over)
    deletes the rows of ranks past the world size and writes every rank's row; later calls write the ranks whose
    urgent fields changed, then the others in turn (round robin) up to `rows_per_second` times the seconds since
    the previous call, at least one row."""

    def __init__(self, num_ranks: int, *, rows_per_second: float = RANK_ROWS_PER_SECOND):
        self.num_ranks = num_ranks
        self.rows_per_second = rows_per_second
        self._written: dict[int, tuple[Any, ...]] = {}  # rank -> its urgent fields as last written
        self._next = 0  # the round robin's next rank
        self._last_call: float | None = None

    def write(
        self, *, session: Session, job_id: int, attempt: int, rows: Sequence[dict[str, Any]], now: float
    ) -> int:
        """Write what is due (the class docstring); returns the number of rows written."""
        stamp = datetime.fromtimestamp(now, UTC)
        written = 0
        if self._last_call is None:
            session.execute(
                delete(rank_status).where(
                    rank_status.c.job_id == job_id, rank_status.c.rank >= self.num_ranks
                )
            )
            have = set(session.scalars(select(rank_status.c.rank).where(rank_status.c.job_id == job_id)))
            if missing := [v for v in rows if v["rank"] not in have]:
                session.execute(
                    insert(rank_status),
                    [{**_columns(v, attempt), "job_id": job_id, "updated_at": stamp} for v in missing],
                )
                self._remember(missing, attempt)
                written += len(missing)
            due = [v for v in rows if v["rank"] in have]
        else:
            budget = max(1, int(self.rows_per_second * max(now - self._last_call, 0.0)))
            due = [v for v in rows if _urgent(v, attempt) != self._written.get(v["rank"])]
            if len(rows) - len(due) <= budget:  # everything fits: a small job gets every row every pass
                due = list(rows)
            else:
                taken = {v["rank"] for v in due}
                for _ in range(len(rows)):
                    if budget == 0:
                        break
                    v = rows[self._next % len(rows)]
                    self._next = (self._next + 1) % len(rows)
                    if v["rank"] not in taken:
                        due.append(v)
                        budget -= 1
        self._last_call = now
        if due:
            session.execute(
                update(rank_status)
                .where(rank_status.c.job_id == job_id, rank_status.c.rank == bindparam("b_rank"))
                .values({k: bindparam(k) for k in (*_COLUMNS, "updated_at")}),
                [{**_columns(v, attempt), "b_rank": v["rank"], "updated_at": stamp} for v in due],
            )
            self._remember(due, attempt)
        return written + len(due)

    def _remember(self, rows: Sequence[dict[str, Any]], attempt: int) -> None:
        for v in rows:
            self._written[v["rank"]] = _urgent(v, attempt)


def _columns(values: dict[str, Any], attempt: int) -> dict[str, Any]:
    last = values["last_progress"]
    return {
        "rank": values["rank"],
        "attempt": attempt,
        "node": values["node"] or "",
        "pid": values["pid"],
        "step": values["step"],
        "last_progress_at": datetime.fromtimestamp(last, UTC) if last is not None else None,
        "own_work_s": values["own_work_s"],
        "step_s": values["step_s"],
        "loss": values["loss"],
        "straggler_score": values["straggler_score"],
        "flagged": values["flagged"],
    }


def _urgent(values: dict[str, Any], attempt: int) -> tuple[Any, ...]:
    """The urgent columns' values (the first four of _COLUMNS), without `_columns`' conversions: this runs for
    every rank every pass."""
    return (attempt, values["node"] or "", values["pid"], values["flagged"])
