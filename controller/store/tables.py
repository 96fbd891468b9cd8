"""The control plane's tables, in SQLAlchemy Core: the schema, what every column means, and nothing of the ORM.

Decisions:
- The tables are Core `Table` objects and the ORM classes (`models.py`) are mapped onto them, so code that only
  reads (`vlctl list`, the job views in `controller.views`) queries them without importing the ORM: a short CLI
  command's start-up is mostly imports, and `sqlalchemy.orm` with the mapped classes is a third of it
  (`bench/bench_cli_startup.py`).
- One `MetaData` with a naming convention, so every index and constraint has a stable, predictable name that
  Alembic migrations can refer to on SQLite and PostgreSQL alike.
- Times are timezone-aware UTC in Python (`UTCDateTime`): PostgreSQL keeps `timestamptz`, SQLite keeps naive UTC
  text (which sorts correctly), and both read back as aware UTC.
- Phases are stored as their lowercase value in a VARCHAR with a CHECK constraint, not a PostgreSQL enum type:
  adding a phase later is a constraint change, not an `ALTER TYPE` dance.
- `jobs.phase` (and `phase_reason`, `phase_message`, `finished_at`) is written only by the state machine in
  `controller.states`; a test walks the source tree to keep it so.
- No foreign key is followed implicitly: queries join explicitly, in sets. Child rows go with their job through
  `ON DELETE CASCADE`.
- Per-rank step statistics are one row per rank per window of steps, never per step, so the table grows with
  `ranks x steps / window`; `records.prune_rank_windows` bounds it further.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
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

metadata = MetaData(naming_convention=NAMING_CONVENTION)


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


def _id() -> Column:
    return Column("id", Integer, primary_key=True)


def _job_id(*, nullable: bool = False) -> Column:
    return Column("job_id", Integer, ForeignKey("jobs.id", ondelete="CASCADE"), nullable=nullable)


def _time(name: str, *, nullable: bool = True, **kw) -> Column:
    return Column(name, UTCDateTime(), nullable=nullable, **kw)


jobs = Table(
    "jobs",
    metadata,
    _id(),
    Column("name", String(NAME_MAX_LEN), nullable=False, unique=True),
    Column("spec", JSON, nullable=False),  # the validated job spec
    Column("phase", PHASE_TYPE, nullable=False, default=Phase.PENDING, index=True),
    Column("phase_reason", String(64), nullable=False, default=Reason.SUBMITTED),
    Column("phase_message", Text, nullable=False, default=""),
    _time("created_at", nullable=False, default=utcnow),
    _time("updated_at", nullable=False, default=utcnow, onupdate=utcnow),
    _time("finished_at"),
    Column("current_attempt", Integer, nullable=False, default=0),  # the newest attempt's number; 0: none yet
    # JobSet-style counters: every restart, and those that count toward the spec's maximum.
    Column("num_restarts", Integer, nullable=False, default=0),
    Column("num_restarts_counted", Integer, nullable=False, default=0),
    # The newest committed (and not known-corrupt) checkpoint, kept here so `list` needs no join.
    Column("last_checkpoint_step", Integer),
    Column("last_checkpoint_uri", Text),
    # The controller managing this job, until its lease runs out (see store.claims).
    Column("claimed_by", String(CONTROLLER_ID_MAX_LEN)),
    _time("lease_expires_at"),
    # The seq of this job's newest event; bumped atomically per event so the timeline has no gaps or ties.
    Column("event_seq", Integer, nullable=False, default=0),
    # Goodput: productive training time and the time lost by cause (startup, detection, restart, ...).
    Column("productive_seconds", Double, nullable=False, default=0.0),
    Column("lost_seconds", JSON, nullable=False, default=dict),
    Column("ettr", Double),  # productive time over wall time since submission
    # Live progress, refreshed by the managing controller from the ranks' telemetry (for status, list, CRD).
    Column("current_step", Integer),
    Column("total_steps", Integer),
    Column("loss", Double),
    Column("tokens_per_second", Double),
    _time("progress_at"),  # when current_step last advanced
    Column("checkpoint_interval_steps", Integer),  # in effect (the spec's number, or what `auto` chose)
    # A person's request (`vlctl resume --from-step N`): the next launch resumes from this step's checkpoint.
    Column("resume_from_step", Integer),
    _time("next_attempt_at"),  # restarting: the backoff ends then
    Column("run_dir", Text),  # logs, metrics, checkpoints (set at the first launch)
)

# One launch of a job's gang of ranks.
attempts = Table(
    "attempts",
    metadata,
    _id(),
    _job_id(),
    Column("number", Integer, nullable=False),  # 1, 2, ... per job
    Column("nodes", JSON, nullable=False),
    Column("launched_by", String(CONTROLLER_ID_MAX_LEN), nullable=False),
    _time("started_at", nullable=False),
    _time("running_at"),
    _time("ended_at"),
    Column("exit_class", String(64)),
    Column("exit_detail", Text),
    # How it failed, as the failure rules classified it (`exit_class` is the class): the restart policy's history
    # is read from these columns. `retryable` is None while the attempt runs and when it ended without a
    # classified failure (succeeded, cancelled, an interrupted launch).
    Column("retryable", Boolean),
    Column("counts_toward_limit", Boolean),  # toward the spec's max_restarts and the crash-loop guard
    Column("failure_step", Integer),  # its last completed step when it failed; None: it never completed one
    Column("failure_message", Text),
    Column("resumed_from_step", Integer),
    Column("resumed_from_uri", Text),
    # What the backend needs to find the gang again after a controller restart (`Backend.attach`).
    Column("backend_record", JSON),
    # The attempt's timeline for goodput, filled in by the managing controller.
    _time("first_step_at"),
    _time("failed_at"),  # a rank died, or (hang) the job's last progress
    _time("detected_at"),  # the controller noticed
    Column("last_step", Integer),
    Column("checkpoint_stall_seconds", Double, nullable=False, default=0.0),
    Column("straggler_seconds", Double, nullable=False, default=0.0),  # everyone waited for flagged ranks
    UniqueConstraint("job_id", "number"),
)

# The job's timeline; `seq` orders it (1, 2, ... per job, no gaps).
events = Table(
    "events",
    metadata,
    _id(),
    _job_id(),
    Column("seq", Integer, nullable=False),
    Column("attempt", Integer),  # the attempt number it concerns, if any
    _time("time", nullable=False),
    Column("type", String(32), nullable=False),
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("data", JSON),
    UniqueConstraint("job_id", "seq"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    _id(),
    _job_id(),
    Column("step", Integer, nullable=False),
    Column("uri", Text, nullable=False),
    Column("attempt", Integer),
    Column("committed", Boolean, nullable=False, default=False),
    Column("verified", Boolean),  # None: not checked yet; False: its manifest did not match (never resume it)
    Column("size_bytes", BigInteger),
    Column("save_seconds", Double),  # how long the ranks were blocked saving it
    _time("created_at", nullable=False, default=utcnow),
    _time("committed_at"),
    UniqueConstraint("job_id", "step"),
)

# One rank's step times aggregated over a window of steps [window_start_step, window_end_step].
rank_step_windows = Table(
    "rank_step_windows",
    metadata,
    _id(),
    _job_id(),
    Column("attempt", Integer, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("node", String(NODE_MAX_LEN), nullable=False),
    Column("window_start_step", Integer, nullable=False),
    Column("window_end_step", Integer, nullable=False),
    Column("num_steps", Integer, nullable=False),
    # Own work: the rank's time outside collectives waiting on others, the signal that isolates a straggler.
    Column("mean_own_s", Double, nullable=False),
    Column("median_own_s", Double, nullable=False),
    Column("p90_own_s", Double, nullable=False),
    Column("mean_wall_s", Double),  # NULL: the detector records own work only (migration 0005)
    Column("straggler_score", Double),
    Column("flagged", Boolean, nullable=False, default=False),
    _time("recorded_at", nullable=False, default=utcnow),
    UniqueConstraint("job_id", "attempt", "rank", "window_start_step"),
    Index(None, "job_id", "window_start_step"),
)

# Each rank's latest state in the job's current attempt: one row per rank, refreshed within a budget (records.RankRows).
RANK_STATUS_FILLFACTOR = 50
rank_status = Table(
    "rank_status",
    metadata,
    _id(),
    _job_id(),
    Column("attempt", Integer, nullable=False),
    Column("rank", Integer, nullable=False),
    Column("node", String(NODE_MAX_LEN), nullable=False),
    Column("pid", Integer),
    Column("step", Integer),
    _time("last_progress_at"),
    Column("own_work_s", Double),
    Column("step_s", Double),
    Column("loss", Double),
    Column("straggler_score", Double),
    Column("flagged", Boolean, nullable=False, default=False),
    _time("updated_at", nullable=False, default=utcnow),
    UniqueConstraint("job_id", "rank"),
    # Half of each page left free, so that an update finds room beside its row: PostgreSQL then updates in
    # place of the page (HOT: no index entries) and its WAL for the rows a controller refreshes every second
    # falls from 98-100 KB/s to 38 KB/s at 16,384 ranks (migration 0004; bench_controller_scale).
    postgresql_with={"fillfactor": RANK_STATUS_FILLFACTOR},
)

# A node's exclusion, for one job (`job_id`) or for every job (`job_id` None), until `expires_at`.
node_health = Table(
    "node_health",
    metadata,
    _id(),
    Column("node", String(NODE_MAX_LEN), nullable=False),
    _job_id(nullable=True),
    Column("excluded", Boolean, nullable=False, default=True),
    Column("reason", String(64), nullable=False),
    Column("message", Text, nullable=False, default=""),
    _time("expires_at"),  # None: until cleared
    _time("updated_at", nullable=False, default=utcnow, onupdate=utcnow),
    Index(None, "node"),
)
