"""Which controller manages which job: claims with leases, so two controllers never launch a job twice.

A controller claims a job by writing its id in `jobs.claimed_by` with a lease (`lease_expires_at`), renews the
leases it holds on every reconcile pass, and may take over a job whose lease ran out (its controller died or hung).
Launching requires holding the claim, checked under the job's row lock in the same transaction as the
pending -> launching transition (`controller.states.launch`), so a controller whose lease was taken over
cannot launch, and a job that another controller already launched is no longer pending.

Concurrency:
- PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED` hands each controller a disjoint set of rows without waiting
  on the others; the lock is held until the claim commits.
- SQLite: a single writer. `Store.transaction()` begins with `BEGIN IMMEDIATE`, which takes the write lock before
  the SELECT, so the read and the claim are one atomic step.

Leases are compared with the controllers' clocks (`now`), which is simple and testable; it assumes clocks agree
to well within a lease (seconds of skew against leases of tens of seconds).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from controller.domain.phases import ACTIVE_PHASES, EventType, Phase

from .models import Job
from .repo import append_event
from .tables import CONTROLLER_ID_MAX_LEN, utcnow

LEASE_TAKEN_OVER = "LeaseTakenOver"


class ClaimNotHeld(RuntimeError):
    def __init__(self, job: Job, controller_id: str):
        holder = f"held by {job.claimed_by!r} until {job.lease_expires_at}" if job.claimed_by else "unclaimed"
        super().__init__(
            f"controller {controller_id!r} does not hold the claim on job {job.name!r} ({holder})"
        )
        self.job_name = job.name
        self.controller_id = controller_id


def _check(controller_id: str, lease_seconds: float) -> None:
    if not controller_id or len(controller_id) > CONTROLLER_ID_MAX_LEN:
        raise ValueError(
            f"controller_id: must be 1 to {CONTROLLER_ID_MAX_LEN} characters, got {controller_id!r}"
        )
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds: must be > 0, got {lease_seconds}")


def claim_jobs(
    *,
    session: Session,
    controller_id: str,
    lease_seconds: float,
    limit: int,
    phases: Collection[Phase] = ACTIVE_PHASES,
    backends: Collection[str] | None = None,
    now: datetime | None = None,
) -> list[Job]:
    """Claim up to `limit` jobs in `phases` that nobody holds (or whose lease ran out), oldest first; only jobs
    whose spec names one of `backends` when given (a local controller and an operator may share a store).

    Jobs this controller already holds are not returned: `renew_leases` keeps those. A takeover from another
    controller is recorded on the job's timeline.
    """
    _check(controller_id, lease_seconds)
    now = now or utcnow()
    claimable = or_(Job.claimed_by.is_(None), Job.lease_expires_at.is_(None), Job.lease_expires_at <= now)
    stmt = (
        select(Job)
        .where(Job.phase.in_(list(phases)), claimable)
        # A spec without the key (written by hand, not through the model) means the model's default: local.
        .where(
            func.coalesce(Job.spec["backend"].as_string(), "local").in_(list(backends))
            if backends is not None
            else True
        )
        .order_by(Job.created_at, Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    jobs = list(session.scalars(stmt))
    for job in jobs:
        previous, expired_at = job.claimed_by, job.lease_expires_at
        job.claimed_by = controller_id
        job.lease_expires_at = now + timedelta(seconds=lease_seconds)
        if previous is not None and previous != controller_id:
            append_event(
                session=session,
                job=job,
                type=EventType.CONTROLLER,
                reason=LEASE_TAKEN_OVER,
                message=f"controller {controller_id} took over from {previous}, whose lease expired at {expired_at}",
                data={"from": previous, "to": controller_id},
                now=now,
            )
    session.flush()
    return jobs


def claim_pending_jobs(
    *, session: Session, controller_id: str, lease_seconds: float, limit: int, now: datetime | None = None
) -> list[Job]:
    """Claim pending jobs to launch them (see `claim_jobs`)."""
    return claim_jobs(
        session=session,
        controller_id=controller_id,
        lease_seconds=lease_seconds,
        limit=limit,
        phases=(Phase.PENDING,),
        now=now,
    )


def renew_leases(
    *, session: Session, controller_id: str, lease_seconds: float, now: datetime | None = None
) -> set[int]:
    """Extend every lease this controller still holds; returns those jobs' ids.

    A job missing from the answer was taken over by another controller: stop managing it (its ranks belong to the
    new owner now). Renewing a lapsed lease nobody took is allowed: the claim is still this controller's.
    """
    _check(controller_id, lease_seconds)
    now = now or utcnow()
    stmt = (
        update(Job)
        .where(Job.claimed_by == controller_id, Job.phase.in_(list(ACTIVE_PHASES)))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Job.id)
        .execution_options(synchronize_session="fetch")
    )
    return set(session.scalars(stmt))


def release_claims(*, session: Session, controller_id: str, job_ids: Collection[int] | None = None) -> int:
    """Give up this controller's claims (all, or those in `job_ids`), e.g. on a clean shutdown; returns how many."""
    stmt = update(Job).where(Job.claimed_by == controller_id)
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    stmt = stmt.values(claimed_by=None, lease_expires_at=None).execution_options(synchronize_session="fetch")
    return session.execute(stmt).rowcount  # type: ignore[attr-defined]


def holds_claim(job: Job, *, controller_id: str, now: datetime | None = None) -> bool:
    expires = job.lease_expires_at
    return job.claimed_by == controller_id and expires is not None and expires > (now or utcnow())


def require_claim(job: Job, *, controller_id: str, now: datetime | None = None) -> None:
    """Raise ClaimNotHeld unless this controller holds a live lease on `job` (call it with the row locked)."""
    if not holds_claim(job, controller_id=controller_id, now=now):
        raise ClaimNotHeld(job, controller_id)
