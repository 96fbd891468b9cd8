"""The read model: what a job looks like to the people and tools watching it.

One `JobView` answers "what is this job's status?" for every surface: `vlctl list`/`status` (table and
`--output json`), the live view of `vlctl run`, a TrainingJob's status subresource (k8s/status.py writes it from a
view and reads one back from it for `vlctl --backend kubernetes`), the controller's Prometheus metrics and the
dashboard. Each derived number (progress, ETA, stragglers) is defined once, here.

Decisions:

- Views are plain frozen values built in one read session with set-based queries (`read_job_views`: one query
  per table for any number of jobs), so a scrape of many jobs costs as much as a status of one. They query the
  Core tables, not the ORM classes: `vlctl list` then never imports the ORM (see controller/store/tables.py).
- ETA is the remaining steps times the median step time of the current attempt's ranks, and only while the job
  is active (a finished or queued job has none).
- `ranks` is None where the source does not know them (a TrainingJob's status carries only the flagged ranks, as
  `stragglers`); an empty tuple means the store knows the job has no rank rows.
- `as_dict` is the JSON of `vlctl status -o json` and, without ranks, of `vlctl list -o json`: the same keys
  whichever backend answered, None where that backend has no value.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, or_, select

from controller.domain.phases import ACTIVE_PHASES, Phase
from controller.store.tables import attempts, checkpoints, jobs, node_health, rank_status, utcnow

if TYPE_CHECKING:
    from sqlalchemy import Connection, Row
    from sqlalchemy.orm import Session

    from controller.store.models import Job

    Reader = Connection | Session  # Core rows from either; the views need no ORM


@dataclass(frozen=True, slots=True, kw_only=True)
class RankView:
    rank: int
    node: str
    attempt: int | None = None
    pid: int | None = None
    step: int | None = None
    last_progress: datetime | None = None
    own_work_s: float | None = None
    step_s: float | None = None
    loss: float | None = None
    straggler_score: float | None = None
    flagged: bool = False
    updated: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointView:
    step: int
    uri: str | None
    committed_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptView:
    number: int
    nodes: tuple[str, ...]
    started: datetime | None
    running: datetime | None = None
    ended: datetime | None = None
    exit_class: str | None = None
    resumed_from_step: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterObject:
    """What only a TrainingJob has: where it lives and how far the operator has taken it."""

    namespace: str | None
    uid: str | None
    deleted: str | None = None  # the deletion timestamp while finalizers hold it
    generation: int | None = None
    observed_generation: int | None = None
    finalizers: tuple[str, ...] = ()
    conditions: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class JobView:
    name: str
    phase: Phase | None  # None: a TrainingJob the operator has not admitted yet
    reason: str | None = None
    message: str | None = None
    backend: str | None = None
    attempt: int = 0
    restarts: int = 0
    restarts_counted: int = 0
    max_restarts: int | None = None
    nodes: int | None = None
    procs_per_node: int | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    progress_at: datetime | None = None
    checkpoint_interval_steps: int | None = None
    last_checkpoint: CheckpointView | None = None
    resume_from_step: int | None = None
    next_attempt_at: datetime | None = None
    run_dir: str | None = None
    ettr: float | None = None
    productive_seconds: float | None = None
    lost_seconds: Mapping[str, float] = field(default_factory=dict)
    excluded_nodes: tuple[str, ...] = ()
    created: datetime | None = None
    updated: datetime | None = None
    finished: datetime | None = None
    current_attempt: AttemptView | None = None
    ranks: tuple[RankView, ...] | None = None
    stragglers: tuple[RankView, ...] = ()  # flagged ranks of the current attempt
    cluster: ClusterObject | None = None
    # In-place recovery's live state, from the attempt's recovery coordinator (`vlctl status` asks it; None
    # without one): round, committed_step, spares [{name, state: waiting | starting}], or error.
    in_place: Mapping[str, Any] | None = None

    @property
    def progress(self) -> float | None:
        """The fraction of the steps done."""
        if self.step is None or not self.total_steps:
            return None
        return min(1.0, self.step / self.total_steps)

    @property
    def eta_seconds(self) -> float | None:
        step_times = [r.step_s for r in self.ranks or () if r.step_s is not None]
        return eta_seconds(self.phase, self.step, self.total_steps, step_times)

    def as_dict(self, *, ranks: bool = True) -> dict[str, Any]:
        """The JSON keys of `vlctl status -o json` (and of `list -o json` without ranks)."""
        c = self.cluster
        a = self.current_attempt
        ckpt = self.last_checkpoint
        data: dict[str, Any] = {
            "name": self.name,
            "namespace": None if c is None else c.namespace,
            "uid": None if c is None else c.uid,
            "backend": self.backend,
            "phase": None if self.phase is None else str(self.phase),
            "reason": self.reason,
            "message": self.message,
            "attempt": self.attempt,
            "restarts": self.restarts,
            "restarts_counted": self.restarts_counted,
            "max_restarts": self.max_restarts,
            "nodes": self.nodes,
            "procs_per_node": self.procs_per_node,
            "step": self.step,
            "total_steps": self.total_steps,
            "progress": self.progress,
            "loss": self.loss,
            "tokens_per_second": self.tokens_per_second,
            "eta_seconds": self.eta_seconds,
            "progress_at": iso(self.progress_at),
            "checkpoint_interval_steps": self.checkpoint_interval_steps,
            "last_checkpoint_step": None if ckpt is None else ckpt.step,
            "last_checkpoint_uri": None if ckpt is None else ckpt.uri,
            "last_checkpoint": None
            if ckpt is None
            else {"step": ckpt.step, "uri": ckpt.uri, "committed_at": iso(ckpt.committed_at)},
            "resume_from_step": self.resume_from_step,
            "next_attempt_at": iso(self.next_attempt_at),
            "run_dir": self.run_dir,
            "ettr": self.ettr,
            "productive_seconds": self.productive_seconds,
            "lost_seconds": dict(self.lost_seconds),
            "excluded_nodes": list(self.excluded_nodes),
            "stragglers": [
                {"rank": r.rank, "node": r.node, "score": r.straggler_score} for r in self.stragglers
            ],
            "created": iso(self.created),
            "updated": iso(self.updated),
            "finished": iso(self.finished),
            "in_place": None if self.in_place is None else dict(self.in_place),
            "attempt_started": None if a is None else iso(a.started),
            "current_attempt": None
            if a is None
            else {
                "number": a.number,
                "nodes": list(a.nodes),
                "started": iso(a.started),
                "running": iso(a.running),
                "ended": iso(a.ended),
                "exit_class": a.exit_class,
                "resumed_from_step": a.resumed_from_step,
            },
        }
        if c is not None:
            data |= {
                "deleted": c.deleted,
                "generation": c.generation,
                "observed_generation": c.observed_generation,
                "finalizers": list(c.finalizers),
                "conditions": [dict(x) for x in c.conditions],
            }
        if ranks:
            data["ranks"] = None if self.ranks is None else [rank_dict(r) for r in self.ranks]
        return data


def eta_seconds(
    phase: Phase | None, step: int | None, total_steps: int | None, step_times: Sequence[float]
) -> float | None:
    """Remaining steps times the median step time; only while the job is active."""
    if phase not in ACTIVE_PHASES or not step_times or total_steps is None:
        return None
    return max(0, total_steps - (step or 0)) * statistics.median(step_times)


def iso(value: datetime | None) -> str | None:
    """A time as the JSON documents give it (ISO 8601), None as None."""
    return None if value is None else value.isoformat()


def rank_dict(r: RankView) -> dict[str, Any]:
    """A rank as `vlctl status -o json` and the dashboard give it."""
    return {
        "rank": r.rank,
        "attempt": r.attempt,
        "node": r.node,
        "pid": r.pid,
        "step": r.step,
        "last_progress": iso(r.last_progress),
        "own_work_s": r.own_work_s,
        "step_s": r.step_s,
        "loss": r.loss,
        "straggler_score": r.straggler_score,
        "flagged": r.flagged,
        "updated": iso(r.updated),
    }


# ------------------------------------------------------------------------------------------------ from the store


@dataclass(frozen=True, slots=True)
class NodeSummary:
    """One node's ranks in a large job, as `vlctl status` and the dashboard show them."""

    node: str
    ranks: int
    first_step: int | None  # the furthest-behind rank's step
    last_step: int | None
    own_work_median_s: float | None
    own_work_max_s: float | None
    flagged: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "ranks": self.ranks,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "own_work_median_s": self.own_work_median_s,
            "own_work_max_s": self.own_work_max_s,
            "flagged": self.flagged,
        }


def node_summaries(ranks: Sequence[RankView]) -> list[NodeSummary]:
    """Every node of the ranks, the ones worth a look first: most flagged ranks, then furthest behind, then the
    slowest median own work."""
    by_node: dict[str, list[RankView]] = defaultdict(list)
    for r in ranks:
        by_node[r.node].append(r)
    out = []
    for node, members in by_node.items():
        steps = [r.step for r in members if r.step is not None]
        own = sorted(r.own_work_s for r in members if r.own_work_s is not None)
        out.append(
            NodeSummary(
                node=node,
                ranks=len(members),
                first_step=min(steps) if steps else None,
                last_step=max(steps) if steps else None,
                own_work_median_s=own[len(own) // 2] if own else None,
                own_work_max_s=own[-1] if own else None,
                flagged=sum(r.flagged for r in members),
            )
        )
    inf = float("inf")
    out.sort(
        key=lambda n: (
            -n.flagged,
            inf if n.first_step is None else n.first_step,
            -(n.own_work_median_s or 0.0),
            n.node,
        )
    )
    return out


def ranks_worth_a_look(ranks: Sequence[RankView], limit: int) -> list[RankView]:
    """The `limit` ranks worth a look first: flagged, then the furthest behind (a rank with no step yet: last),
    then the slowest own work."""
    inf = float("inf")
    return sorted(
        ranks,
        key=lambda r: (not r.flagged, inf if r.step is None else r.step, -(r.own_work_s or 0.0), r.rank),
    )[:limit]


def event_dict(e: Any) -> dict[str, Any]:
    """An event row (ORM or Core) as `vlctl events -o json` and the dashboard give it."""
    return {
        "seq": e.seq,
        "time": e.time.isoformat(),
        "attempt": e.attempt,
        "type": e.type,
        "reason": e.reason,
        "message": e.message,
        "data": e.data,
    }


def checkpoint_dict(c: Any, *, resume_step: int | None) -> dict[str, Any]:
    """A checkpoint row as `vlctl checkpoints -o json` and the dashboard give it; `resume_step`: the step the
    job's next launch resumes from (an explicit `resume --from-step`, else the newest valid checkpoint)."""
    from trainer.contract.memory import human_bytes

    return {
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


def read_job_views(
    reader: Reader,
    *,
    job_ids: Collection[int] | None = None,
    phases: Collection[Phase] | None = None,
    finished_since: datetime | None = None,
    ranks: bool = True,
    now: datetime | None = None,
) -> list[JobView]:
    """Views of the jobs `job_ids`, or of every job (only those in `phases` or finished at or after
    `finished_since` when either is given), oldest first, in three queries whatever the number of jobs: jobs
    with their current attempt and newest checkpoint, their ranks, the nodes excluded for them. `reader` is a
    Core connection (`Store.read_rows`) or an ORM session."""
    newest = and_(checkpoints.c.job_id == jobs.c.id, checkpoints.c.step == jobs.c.last_checkpoint_step)
    current = and_(attempts.c.job_id == jobs.c.id, attempts.c.number == jobs.c.current_attempt)
    stmt = (
        select(
            jobs,
            *(attempts.c[name].label(f"attempt_{name}") for name in _ATTEMPT_COLUMNS),
            checkpoints.c.committed_at.label("checkpoint_committed_at"),
        )
        .outerjoin(attempts, current)
        .outerjoin(checkpoints, newest)
        .order_by(jobs.c.created_at, jobs.c.id)
    )
    if job_ids is not None:
        stmt = stmt.where(jobs.c.id.in_(list(job_ids)))
    wanted = []
    if phases is not None:
        wanted.append(jobs.c.phase.in_(list(phases)))
    if finished_since is not None:
        wanted.append(jobs.c.finished_at >= finished_since)
    if wanted:
        stmt = stmt.where(or_(*wanted))
    rows = reader.execute(stmt).all()
    if not rows:
        return []
    ids = [row.id for row in rows]

    by_job: dict[int, list[RankView]] = defaultdict(list)
    rank_stmt = select(rank_status).where(rank_status.c.job_id.in_(ids))
    if not ranks:  # the flagged ones only, for `stragglers`
        rank_stmt = rank_stmt.where(rank_status.c.flagged)
    for r in reader.execute(rank_stmt.order_by(rank_status.c.job_id, rank_status.c.rank)):
        by_job[r.job_id].append(_rank_view(r))

    now = now or utcnow()
    cluster_wide: set[str] = set()
    excluded: dict[int, set[str]] = defaultdict(set)
    for job_id, node in reader.execute(
        select(node_health.c.job_id, node_health.c.node).where(
            node_health.c.excluded,
            or_(node_health.c.job_id.is_(None), node_health.c.job_id.in_(ids)),
            or_(node_health.c.expires_at.is_(None), node_health.c.expires_at > now),
        )
    ):
        (cluster_wide if job_id is None else excluded[job_id]).add(node)
    return [
        job_view(
            row,
            attempt=_attempt_view(row),
            checkpoint_committed_at=row.checkpoint_committed_at,
            ranks=by_job.get(row.id, []) if ranks else None,
            flagged=[r for r in by_job.get(row.id, []) if r.flagged],
            excluded_nodes=cluster_wide | excluded[row.id],
        )
        for row in rows
    ]


def read_job_view(reader: Reader, job: Job) -> JobView:
    return read_job_views(reader, job_ids=[job.id])[0]


def job_view(
    job: Row[Any] | Job,
    *,
    attempt: AttemptView | None,
    checkpoint_committed_at: datetime | None,
    ranks: Sequence[RankView] | None,
    flagged: Sequence[RankView],
    excluded_nodes: Collection[str],
) -> JobView:
    """One job's view from its row, with the columns of the `jobs` table (read_job_views reads them for many jobs
    at once)."""
    spec: Mapping[str, Any] = job.spec or {}
    resources = spec.get("resources") if isinstance(spec.get("resources"), Mapping) else {}
    total_steps = job.total_steps
    if total_steps is None:  # before the controller refreshed progress: the spec says how long it trains
        total_steps = _int_at(spec, "training", "training", "steps")
    checkpoint = None
    if job.last_checkpoint_step is not None:
        checkpoint = CheckpointView(
            step=job.last_checkpoint_step, uri=job.last_checkpoint_uri, committed_at=checkpoint_committed_at
        )
    return JobView(
        name=job.name,
        phase=Phase(job.phase),
        reason=job.phase_reason,
        message=job.phase_message,
        backend=spec.get("backend"),
        attempt=job.current_attempt,
        restarts=job.num_restarts,
        restarts_counted=job.num_restarts_counted,
        max_restarts=_int_at(spec, "fault_tolerance", "max_restarts"),
        nodes=_int_at(resources, "nodes"),
        procs_per_node=_int_at(resources, "procs_per_node"),
        step=job.current_step,
        total_steps=total_steps,
        loss=job.loss,
        tokens_per_second=job.tokens_per_second,
        progress_at=job.progress_at,
        checkpoint_interval_steps=job.checkpoint_interval_steps,
        last_checkpoint=checkpoint,
        resume_from_step=job.resume_from_step,
        next_attempt_at=job.next_attempt_at,
        run_dir=job.run_dir,
        ettr=job.ettr,
        productive_seconds=job.productive_seconds,
        lost_seconds={str(k): float(v) for k, v in (job.lost_seconds or {}).items() if v is not None},
        excluded_nodes=tuple(sorted(excluded_nodes)),
        created=job.created_at,
        updated=job.updated_at,
        finished=job.finished_at,
        current_attempt=attempt,
        ranks=None if ranks is None else tuple(ranks),
        stragglers=tuple(r for r in flagged if r.attempt == job.current_attempt),
    )


# The current attempt's columns in read_job_views' row, each labelled attempt_<name>.
_ATTEMPT_COLUMNS = (
    "number",
    "nodes",
    "started_at",
    "running_at",
    "ended_at",
    "exit_class",
    "resumed_from_step",
)


def _attempt_view(row: Row[Any]) -> AttemptView | None:
    if row.attempt_number is None:  # never launched (no attempt row matched)
        return None
    return AttemptView(
        number=row.attempt_number,
        nodes=tuple(row.attempt_nodes),
        started=row.attempt_started_at,
        running=row.attempt_running_at,
        ended=row.attempt_ended_at,
        exit_class=row.attempt_exit_class,
        resumed_from_step=row.attempt_resumed_from_step,
    )


def _rank_view(r: Row[Any]) -> RankView:
    return RankView(
        rank=r.rank,
        node=r.node,
        attempt=r.attempt,
        pid=r.pid,
        step=r.step,
        last_progress=r.last_progress_at,
        own_work_s=r.own_work_s,
        step_s=r.step_s,
        loss=r.loss,
        straggler_score=r.straggler_score,
        flagged=bool(r.flagged),
        updated=r.updated_at,
    )


def _int_at(doc: Mapping[str, Any], *path: str) -> int | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, int) and not isinstance(value, bool) else None
