"""The control plane's ORM classes, mapped onto the Core tables of `tables.py` (which say what each column
means), for the code that writes (a job's phase changes only through `controller.states`).

Decisions:
- Declarative over existing tables (SQLAlchemy's "imperative table" form): the schema is written once, in
  `tables.py`, where read-only code queries it without the ORM; the annotations here type the attributes.
- No ORM relationships: the repository queries in sets with explicit joins, so no attribute access can issue a
  hidden query per row (N+1).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import DeclarativeBase, Mapped

from controller.domain.phases import Phase

from . import tables


class Base(DeclarativeBase):
    metadata = tables.metadata


class Job(Base):
    __table__ = tables.jobs

    id: Mapped[int]
    name: Mapped[str]
    spec: Mapped[dict[str, Any]]
    phase: Mapped[Phase]
    phase_reason: Mapped[str]
    phase_message: Mapped[str]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    current_attempt: Mapped[int]
    num_restarts: Mapped[int]
    num_restarts_counted: Mapped[int]
    last_checkpoint_step: Mapped[int | None]
    last_checkpoint_uri: Mapped[str | None]
    claimed_by: Mapped[str | None]
    lease_expires_at: Mapped[datetime | None]
    event_seq: Mapped[int]
    productive_seconds: Mapped[float]
    lost_seconds: Mapped[dict[str, Any]]
    ettr: Mapped[float | None]
    current_step: Mapped[int | None]
    total_steps: Mapped[int | None]
    loss: Mapped[float | None]
    tokens_per_second: Mapped[float | None]
    progress_at: Mapped[datetime | None]
    checkpoint_interval_steps: Mapped[int | None]
    resume_from_step: Mapped[int | None]
    next_attempt_at: Mapped[datetime | None]
    run_dir: Mapped[str | None]

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.name!r}, phase={self.phase})"


class Attempt(Base):
    """One launch of a job's gang of ranks."""

    __table__ = tables.attempts

    id: Mapped[int]
    job_id: Mapped[int]
    number: Mapped[int]
    nodes: Mapped[list[str]]
    launched_by: Mapped[str]
    started_at: Mapped[datetime]
    running_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    exit_class: Mapped[str | None]
    exit_detail: Mapped[str | None]
    retryable: Mapped[bool | None]
    counts_toward_limit: Mapped[bool | None]
    failure_step: Mapped[int | None]
    failure_message: Mapped[str | None]
    resumed_from_step: Mapped[int | None]
    resumed_from_uri: Mapped[str | None]
    backend_record: Mapped[dict[str, Any] | None]
    first_step_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    detected_at: Mapped[datetime | None]
    last_step: Mapped[int | None]
    checkpoint_stall_seconds: Mapped[float]
    straggler_seconds: Mapped[float]


class Event(Base):
    """The job's timeline; `seq` orders it (1, 2, ... per job, no gaps)."""

    __table__ = tables.events

    id: Mapped[int]
    job_id: Mapped[int]
    seq: Mapped[int]
    attempt: Mapped[int | None]
    time: Mapped[datetime]
    type: Mapped[str]
    reason: Mapped[str]
    message: Mapped[str]
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __table__ = tables.checkpoints

    id: Mapped[int]
    job_id: Mapped[int]
    step: Mapped[int]
    uri: Mapped[str]
    attempt: Mapped[int | None]
    committed: Mapped[bool]
    verified: Mapped[bool | None]
    size_bytes: Mapped[int | None]
    save_seconds: Mapped[float | None]
    created_at: Mapped[datetime]
    committed_at: Mapped[datetime | None]


class RankStepWindow(Base):
    """One rank's step times aggregated over a window of steps [window_start_step, window_end_step]."""

    __table__ = tables.rank_step_windows

    id: Mapped[int]
    job_id: Mapped[int]
    attempt: Mapped[int]
    rank: Mapped[int]
    node: Mapped[str]
    window_start_step: Mapped[int]
    window_end_step: Mapped[int]
    num_steps: Mapped[int]
    mean_own_s: Mapped[float]
    median_own_s: Mapped[float]
    p90_own_s: Mapped[float]
    mean_wall_s: Mapped[float | None]
    straggler_score: Mapped[float | None]
    flagged: Mapped[bool]
    recorded_at: Mapped[datetime]


class RankStatus(Base):
    """Each rank's latest state in the job's current attempt: one row per rank, refreshed within a budget (records.RankRows)."""

    __table__ = tables.rank_status

    id: Mapped[int]
    job_id: Mapped[int]
    attempt: Mapped[int]
    rank: Mapped[int]
    node: Mapped[str]
    pid: Mapped[int | None]
    step: Mapped[int | None]
    last_progress_at: Mapped[datetime | None]
    own_work_s: Mapped[float | None]
    step_s: Mapped[float | None]
    loss: Mapped[float | None]
    straggler_score: Mapped[float | None]
    flagged: Mapped[bool]
    updated_at: Mapped[datetime]


class NodeHealth(Base):
    """A node's exclusion, for one job (`job_id`) or for every job (`job_id` None), until `expires_at`."""

    __table__ = tables.node_health

    id: Mapped[int]
    node: Mapped[str]
    job_id: Mapped[int | None]
    excluded: Mapped[bool]
    reason: Mapped[str]
    message: Mapped[str]
    expires_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
