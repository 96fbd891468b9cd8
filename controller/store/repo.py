"""Jobs, attempts and the event timeline: the queries and writes the controller and the CLI make.

Rules (after Airflow's): every function takes the session keyword-only and never commits, the caller's
`Store.transaction()` does; queries work in sets (one statement for a listing, however many jobs); a job's phase is
never written here (only `controller.states` does), though creating a job starts it in `pending`.

Events are numbered per job by an atomic `UPDATE jobs SET event_seq = event_seq + 1 ... RETURNING`: the row lock
that update takes orders concurrent writers on PostgreSQL, so a job's timeline has no gaps and no ties, and the
unique `(job_id, seq)` turns any slip into an error instead of a silently reused number.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from controller.domain.phases import EventType, Phase, Reason, is_camel_case

from .models import Attempt, Event, Job
from .tables import NAME_MAX_LEN, utcnow

_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class JobNotFound(LookupError):
    def __init__(self, name: str):
        super().__init__(f"no job named {name!r}")
        self.name = name


class JobExists(ValueError):
    def __init__(self, name: str):
        super().__init__(f"name: a job named {name!r} already exists")
        self.name = name


def validate_job_name(name: str) -> str:
    if len(name) > NAME_MAX_LEN or not _DNS_1123_LABEL.fullmatch(name):
        raise ValueError(
            f"name: {name!r} is not a DNS-1123 label (lowercase letters, digits and '-', starting and ending "
            f"with a letter or digit, at most {NAME_MAX_LEN} characters)"
        )
    return name


def create_job(*, session: Session, name: str, spec: Mapping[str, Any], now: datetime | None = None) -> Job:
    """Insert a pending job and its `Submitted` event. Raises JobExists when the name is taken."""
    now = now or utcnow()
    job = Job(name=validate_job_name(name), spec=dict(spec), created_at=now, updated_at=now)
    try:
        # A savepoint, so a taken name leaves the caller's transaction (and session) usable.
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError as err:
        raise JobExists(name) from err
    append_event(session=session, job=job, type=EventType.SUBMITTED, reason=Reason.SUBMITTED, now=now)
    return job


def get_job(*, session: Session, name: str) -> Job:
    job = session.scalars(select(Job).where(Job.name == name)).one_or_none()
    if job is None:
        raise JobNotFound(name)
    return job


def lock_job(*, session: Session, job: Job) -> Job:
    """Reload `job` from the database and hold its row lock until the transaction ends.

    PostgreSQL: `SELECT ... FOR UPDATE`, so a concurrent writer waits and then sees this transaction's changes.
    SQLite ignores `FOR UPDATE`; a `Store.transaction()` already holds the database's single write lock.
    Pending changes to `job` are flushed first, not lost.
    """
    stmt = select(Job).where(Job.id == job.id).with_for_update().execution_options(populate_existing=True)
    return session.scalars(stmt).one()


def list_jobs_with_latest_attempt(
    *, session: Session, phases: Collection[Phase] | None = None
) -> list[tuple[Job, Attempt | None]]:
    """Every job (optionally only those in `phases`) with its newest attempt, in one query, oldest job first."""
    stmt = (
        select(Job, Attempt)
        .outerjoin(Attempt, and_(Attempt.job_id == Job.id, Attempt.number == Job.current_attempt))
        .order_by(Job.created_at, Job.id)
    )
    if phases is not None:
        stmt = stmt.where(Job.phase.in_(list(phases)))
    return [(job, attempt) for job, attempt in session.execute(stmt)]


def append_event(
    *,
    session: Session,
    job: Job,
    type: str,
    reason: str,
    message: str = "",
    data: Mapping[str, Any] | None = None,
    attempt: int | None = None,
    now: datetime | None = None,
) -> Event:
    """Add the next event to `job`'s timeline. `type` and `reason` are CamelCase constants."""
    for field, value in (("type", type), ("reason", reason)):
        if not is_camel_case(value):
            raise ValueError(f"event {field}: {value!r} is not a CamelCase constant")
    bump = (
        update(Job)
        .where(Job.id == job.id)
        .values(event_seq=Job.event_seq + 1)
        .returning(Job.event_seq)
        .execution_options(synchronize_session=False)
    )
    seq = session.execute(bump).scalar_one()
    set_committed_value(job, "event_seq", seq)  # mirror the database without marking the job dirty
    event = Event(
        job_id=job.id,
        seq=seq,
        attempt=attempt,
        time=now or utcnow(),
        type=type,
        reason=reason,
        message=message,
        data=dict(data) if data is not None else None,
    )
    session.add(event)
    return event


def list_events(
    *, session: Session, job_id: int, after_seq: int = 0, limit: int | None = None
) -> list[Event]:
    """The job's events with seq > after_seq, in order (`after_seq` lets `events --follow` poll cheaply)."""
    stmt = select(Event).where(Event.job_id == job_id, Event.seq > after_seq).order_by(Event.seq).limit(limit)
    return list(session.scalars(stmt))


def record_attempt_started(
    *,
    session: Session,
    job: Job,
    nodes: Sequence[str],
    launched_by: str,
    resumed_from_step: int | None = None,
    resumed_from_uri: str | None = None,
    now: datetime | None = None,
) -> Attempt:
    """Insert the job's next attempt and make it current. Called by the state machine when it launches."""
    if not nodes:
        raise ValueError("nodes: an attempt runs on at least one node")
    if (resumed_from_step is None) != (resumed_from_uri is None):
        raise ValueError("resume_from: give both the checkpoint step and its URI, or neither")
    job.current_attempt += 1
    attempt = Attempt(
        job_id=job.id,
        number=job.current_attempt,
        nodes=list(nodes),
        launched_by=launched_by,
        started_at=now or utcnow(),
        resumed_from_step=resumed_from_step,
        resumed_from_uri=resumed_from_uri,
    )
    session.add(attempt)
    return attempt


def get_current_attempt(*, session: Session, job: Job) -> Attempt | None:
    if job.current_attempt == 0:
        return None
    stmt = select(Attempt).where(Attempt.job_id == job.id, Attempt.number == job.current_attempt)
    return session.scalars(stmt).one_or_none()


def record_attempt_ended(
    *,
    session: Session,
    job: Job,
    exit_class: str,
    exit_detail: str | None = None,
    now: datetime | None = None,
) -> Attempt | None:
    """End the job's current attempt, if one is open; returns it (None when there was none to end)."""
    attempt = get_current_attempt(session=session, job=job)
    if attempt is None or attempt.ended_at is not None:
        return None
    attempt.ended_at = now or utcnow()
    attempt.exit_class = exit_class
    attempt.exit_detail = exit_detail
    return attempt


def list_attempts(*, session: Session, job_id: int) -> list[Attempt]:
    return list(session.scalars(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number)))
