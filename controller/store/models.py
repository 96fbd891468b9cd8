"""The control plane's tables, as typed SQLAlchemy 2 mapped classes.

Decisions:
- One `MetaData` with a naming convention, so every index and constraint has a stable, predictable name that
  Alembic migrations can refer to on SQLite and PostgreSQL alike.
- Times are timezone-aware UTC in Python (`UTCDateTime`): PostgreSQL keeps `timestamptz`, SQLite keeps naive UTC
  text (which sorts correctly), and both read back as aware UTC.
- Phases are stored as their lowercase value in a VARCHAR with a CHECK constraint, not a PostgreSQL enum type:
  adding a phase later is a constraint change, not an `ALTER TYPE` dance.
- `Job.phase` (and `phase_reason`, `phase_message`, `finished_at`) is written only by the state machine in
  `controller.states`; a test walks the source tree to keep it so.
- No ORM relationships: the repository queries in sets with explicit joins, so no attribute access can issue a
  hidden query per row (N+1). Child rows go with their job through `ON DELETE CASCADE`.
- Per-rank step statistics are one row per rank per window of steps, never per step, so the table grows with
  `ranks x steps / window`; `records.prune_rank_windows` bounds it further.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from controller.domain.phases import Phase, Reason

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
NAME_MAX_LEN = 63  # a DNS-1123 label
NODE_MAX_LEN = 253  # a DNS-1123 subdomain (Kubernetes node names)
CONTROLLER_ID_MAX_LEN = 128


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store takes timezone-aware times")
        value = value.astimezone(UTC)
        # SQLite's DATETIME text drops the offset; storing UTC keeps comparisons in SQL correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


PHASE_TYPE = Enum(
    Phase,
    name="phase",
    native_enum=False,
    create_constraint=True,
    length=16,
    values_callable=lambda phases: [p.value for p in phases],
    validate_strings=True,
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LEN), unique=True)
    spec: Mapped[dict[str, Any]]  # the validated job spec, as JSON
    phase: Mapped[Phase] = mapped_column(PHASE_TYPE, default=Phase.PENDING, index=True)
    phase_reason: Mapped[str] = mapped_column(String(64), default=Reason.SUBMITTED)
    phase_message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    current_attempt: Mapped[int] = mapped_column(default=0)  # number of the newest attempt; 0: never launched
    # JobSet-style counters: every restart, and those that count toward the spec's maximum.
    num_restarts: Mapped[int] = mapped_column(default=0)
    num_restarts_counted: Mapped[int] = mapped_column(default=0)
    # The newest committed (and not known-corrupt) checkpoint, kept here so `list` needs no join.
    last_checkpoint_step: Mapped[int | None]
    last_checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    # The controller managing this job, until its lease runs out (see store.claims).
    claimed_by: Mapped[str | None] = mapped_column(String(CONTROLLER_ID_MAX_LEN))
    lease_expires_at: Mapped[datetime | None]
    # The seq of this job's newest event; bumped atomically per event so the timeline has no gaps or ties.
    event_seq: Mapped[int] = mapped_column(default=0)
    # Goodput: productive training time and the time lost by cause (startup, detection, restart, ...).
    productive_seconds: Mapped[float] = mapped_column(default=0.0)
    lost_seconds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ettr: Mapped[float | None]  # productive time over wall time since submission
    # Live progress, refreshed by the managing controller from the ranks' telemetry (for status, list, CRD).
    current_step: Mapped[int | None]
    total_steps: Mapped[int | None]
    loss: Mapped[float | None]
    tokens_per_second: Mapped[float | None]
    progress_at: Mapped[datetime | None]  # when current_step last advanced
    checkpoint_interval_steps: Mapped[int | None]  # in effect (the spec's number, or what `auto` chose)
    # A person's request (`vlctl resume --from-step N`): the next launch resumes from this step's checkpoint.
    resume_from_step: Mapped[int | None]
    next_attempt_at: Mapped[datetime | None]  # restarting: the backoff ends then
    run_dir: Mapped[str | None] = mapped_column(Text)  # logs, metrics, checkpoints (set at the first launch)

    def __repr__(self) -> str:
        return f"Job(id={self.id}, name={self.name!r}, phase={self.phase})"


class Attempt(Base):
    """One launch of a job's gang of ranks."""

    __tablename__ = "attempts"
    __table_args__ = (UniqueConstraint("job_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int]  # 1, 2, ... per job
    nodes: Mapped[list[str]]
    launched_by: Mapped[str] = mapped_column(String(CONTROLLER_ID_MAX_LEN))
    started_at: Mapped[datetime]
    running_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    exit_class: Mapped[str | None] = mapped_column(String(64))
    exit_detail: Mapped[str | None] = mapped_column(Text)
    # How it failed, as the failure rules classified it (`exit_class` is the class): the restart policy's history
    # is read from these columns. `retryable` is None while the attempt runs and when it ended without a
    # classified failure (succeeded, cancelled, an interrupted launch).
    retryable: Mapped[bool | None]
    counts_toward_limit: Mapped[bool | None]  # toward the spec's max_restarts and the crash-loop guard
    failure_step: Mapped[int | None]  # its last completed step when it failed; None: it never completed one
    failure_message: Mapped[str | None] = mapped_column(Text)
    resumed_from_step: Mapped[int | None]
    resumed_from_uri: Mapped[str | None] = mapped_column(Text)
    # What the backend needs to find the gang again after a controller restart (`Backend.attach`).
    backend_record: Mapped[dict[str, Any] | None]
    # The attempt's timeline for goodput, filled in by the managing controller.
    first_step_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]  # a rank died, or (hang) the job's last progress
    detected_at: Mapped[datetime | None]  # the controller noticed
    last_step: Mapped[int | None]
    checkpoint_stall_seconds: Mapped[float] = mapped_column(default=0.0)
    straggler_seconds: Mapped[float] = mapped_column(default=0.0)  # time everyone waited for flagged ranks


class Event(Base):
    """The job's timeline; `seq` orders it (1, 2, ... per job, no gaps)."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    attempt: Mapped[int | None]  # the attempt number it concerns, if any
    time: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    uri: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int | None]
    committed: Mapped[bool] = mapped_column(default=False)
    verified: Mapped[
        bool | None
    ]  # None: not checked yet; False: its manifest did not match (never resume it)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    save_seconds: Mapped[float | None]  # how long the ranks were blocked saving it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    committed_at: Mapped[datetime | None]


class RankStepWindow(Base):
    """One rank's step times aggregated over a window of steps [window_start_step, window_end_step]."""

    __tablename__ = "rank_step_windows"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", "rank", "window_start_step"),
        Index(None, "job_id", "window_start_step"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int]
    rank: Mapped[int]
    node: Mapped[str] = mapped_column(String(NODE_MAX_LEN))
    window_start_step: Mapped[int]
    window_end_step: Mapped[int]
    num_steps: Mapped[int]
    # Own work: the rank's time outside collectives waiting on others, the signal that isolates a straggler.
    mean_own_s: Mapped[float]
    median_own_s: Mapped[float]
    p90_own_s: Mapped[float]
    mean_wall_s: Mapped[float]
    straggler_score: Mapped[float | None]
    flagged: Mapped[bool] = mapped_column(default=False)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class RankStatus(Base):
    """Each rank's latest state in the job's current attempt: one row per rank, overwritten every pass."""

    __tablename__ = "rank_status"
    __table_args__ = (UniqueConstraint("job_id", "rank"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int]
    rank: Mapped[int]
    node: Mapped[str] = mapped_column(String(NODE_MAX_LEN))
    pid: Mapped[int | None]
    step: Mapped[int | None]
    last_progress_at: Mapped[datetime | None]
    own_work_s: Mapped[float | None]
    step_s: Mapped[float | None]
    loss: Mapped[float | None]
    straggler_score: Mapped[float | None]
    flagged: Mapped[bool] = mapped_column(default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeHealth(Base):
    """A node's exclusion, for one job (`job_id`) or for every job (`job_id` None), until `expires_at`."""

    __tablename__ = "node_health"
    __table_args__ = (Index(None, "node"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node: Mapped[str] = mapped_column(String(NODE_MAX_LEN))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    excluded: Mapped[bool] = mapped_column(default=True)
    reason: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text, default="")
    expires_at: Mapped[datetime | None]  # None: until cleared
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
