"""The job state machine: the only code that changes a job's phase.

    pending ──launch──> launching ──mark_running──> running ──succeed──> succeeded
                          │   ^                        │
                          │   └──────launch────┐       │
                          └──restart──> restarting <───┘ restart
    any non-terminal phase ──fail──> failed      any non-terminal phase ──cancel──> cancelled
    failed | cancelled ──reopen──> restarting        (a person's `vlctl resume`; the only way out of an end)

Every transition
- reloads the job under its row lock (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite's write transaction is
  already exclusive), so the guard sees the committed phase, not a stale copy;
- checks the guard (`ALLOWED_FROM`: the phases the target may be entered from) and raises `InvalidTransition`
  otherwise; terminal phases allow nothing;
- writes the phase, its reason and message, and exactly one `PhaseChanged` event, in the caller's transaction
  (nothing is committed here), so the phase and its event are stored together or not at all.

Launching requires the caller to hold the job's claim (`store.claims`), checked after the row lock in the same
transaction as the transition, so two controllers never launch the same attempt. Controller-driven transitions
take an optional `controller_id` to get the same check; `cancel` takes none, as a person may cancel any job. On a
terminal phase the claim is released: the owning controller notices on its next pass and tears the ranks down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from controller.domain.phases import ACTIVE_PHASES, TERMINAL_PHASES, EventType, Phase, Reason
from controller.store.claims import require_claim
from controller.store.models import Attempt, Job
from controller.store.repo import (
    append_event,
    get_current_attempt,
    lock_job,
    record_attempt_ended,
    record_attempt_started,
)
from controller.store.tables import utcnow

ALLOWED_FROM: Mapping[Phase, frozenset[Phase]] = {
    Phase.PENDING: frozenset(),  # only ever the initial phase
    Phase.LAUNCHING: frozenset({Phase.PENDING, Phase.RESTARTING}),
    Phase.RUNNING: frozenset({Phase.LAUNCHING}),
    Phase.RESTARTING: frozenset({Phase.LAUNCHING, Phase.RUNNING}),
    Phase.SUCCEEDED: frozenset({Phase.RUNNING}),
    Phase.FAILED: ACTIVE_PHASES,
    Phase.CANCELLED: ACTIVE_PHASES,
}
SUCCEEDED_EXIT_CLASS = "Succeeded"
CANCELLED_EXIT_CLASS = "Cancelled"


# `reopen` alone leaves a terminal phase, on a person's request; the transition table keeps them final.
REOPENABLE_FROM: frozenset[Phase] = frozenset({Phase.FAILED, Phase.CANCELLED})
REASON_RESUME_REQUESTED = "ResumeRequested"


class InvalidTransition(RuntimeError):
    def __init__(self, job: Job, current: Phase, target: Phase, message: str | None = None):
        allowed = ", ".join(sorted(ALLOWED_FROM[target])) or "nowhere"
        super().__init__(
            message
            or f"job {job.name!r} cannot go from {current} to {target} ({target} is entered from {allowed})"
        )
        self.job_name, self.current, self.target = job.name, current, target


def can_transition(current: Phase, target: Phase) -> bool:
    return current in ALLOWED_FROM[target]


def launch(
    job: Job,
    *,
    session: Session,
    controller_id: str,
    nodes: Sequence[str],
    resume_from_step: int | None = None,
    resume_from_uri: str | None = None,
    now: datetime | None = None,
) -> Attempt:
    """pending|restarting -> launching: start the next attempt on `nodes`, from a checkpoint or from scratch."""
    now = now or utcnow()
    job, current = _guard(job, Phase.LAUNCHING, session=session, controller_id=None)
    require_claim(job, controller_id=controller_id, now=now)
    attempt = record_attempt_started(
        session=session,
        job=job,
        nodes=nodes,
        launched_by=controller_id,
        resumed_from_step=resume_from_step,
        resumed_from_uri=resume_from_uri,
        now=now,
    )
    resumed = f" from the checkpoint at step {resume_from_step}" if resume_from_step is not None else ""
    _write(
        job,
        current,
        Phase.LAUNCHING,
        session=session,
        reason=Reason.LAUNCHED,
        message=f"attempt {attempt.number} launching on {len(nodes)} node(s){resumed}",
        data={"nodes": list(nodes), "resume_from_step": resume_from_step, "controller": controller_id},
        now=now,
    )
    return attempt


def mark_running(
    job: Job,
    *,
    session: Session,
    controller_id: str | None = None,
    message: str = "",
    now: datetime | None = None,
) -> None:
    """launching -> running: every rank of the current attempt is up."""
    now = now or utcnow()
    job, current = _guard(job, Phase.RUNNING, session=session, controller_id=controller_id, now=now)
    attempt = get_current_attempt(session=session, job=job)
    if attempt is not None:
        attempt.running_at = now
    _write(
        job, current, Phase.RUNNING, session=session, reason=Reason.RANKS_STARTED, message=message, now=now
    )


def restart(
    job: Job,
    *,
    session: Session,
    exit_class: str,
    detail: str = "",
    counts_toward_limit: bool = True,
    reason: str = Reason.RESTART_SCHEDULED,
    controller_id: str | None = None,
    delay_seconds: float = 0.0,
    now: datetime | None = None,
) -> None:
    """launching|running -> restarting: the attempt failed in a retryable way; the next launch resumes it after
    `delay_seconds` (the backoff)."""
    now = now or utcnow()
    job, current = _guard(job, Phase.RESTARTING, session=session, controller_id=controller_id, now=now)
    record_attempt_ended(session=session, job=job, exit_class=exit_class, exit_detail=detail or None, now=now)
    job.num_restarts += 1
    job.num_restarts_counted += int(counts_toward_limit)
    job.next_attempt_at = now + timedelta(seconds=max(0.0, delay_seconds))
    data = {
        "exit_class": exit_class,
        "counts_toward_limit": counts_toward_limit,
        "num_restarts": job.num_restarts,
        "delay_seconds": delay_seconds,
    }
    _write(job, current, Phase.RESTARTING, session=session, reason=reason, message=detail, data=data, now=now)


def succeed(
    job: Job, *, session: Session, controller_id: str | None = None, now: datetime | None = None
) -> None:
    """running -> succeeded: every rank finished the last step."""
    now = now or utcnow()
    job, current = _guard(job, Phase.SUCCEEDED, session=session, controller_id=controller_id, now=now)
    record_attempt_ended(session=session, job=job, exit_class=SUCCEEDED_EXIT_CLASS, now=now)
    _write(job, current, Phase.SUCCEEDED, session=session, reason=Reason.COMPLETED, now=now)


def fail(
    job: Job,
    *,
    session: Session,
    message: str,
    reason: str = Reason.FAILED,
    exit_class: str | None = None,
    controller_id: str | None = None,
    now: datetime | None = None,
) -> None:
    """Any non-terminal phase -> failed, with the reason (e.g. `controller.policy`'s `ReachedMaxRestarts`)."""
    now = now or utcnow()
    job, current = _guard(job, Phase.FAILED, session=session, controller_id=controller_id, now=now)
    record_attempt_ended(
        session=session, job=job, exit_class=exit_class or reason, exit_detail=message, now=now
    )
    data = {"exit_class": exit_class} if exit_class else None
    _write(job, current, Phase.FAILED, session=session, reason=reason, message=message, data=data, now=now)


def cancel(job: Job, *, session: Session, message: str = "cancelled", now: datetime | None = None) -> None:
    """Any non-terminal phase -> cancelled. Needs no claim; the owning controller then stops the ranks."""
    now = now or utcnow()
    job, current = _guard(job, Phase.CANCELLED, session=session, controller_id=None, now=now)
    record_attempt_ended(
        session=session, job=job, exit_class=CANCELLED_EXIT_CLASS, exit_detail=message, now=now
    )
    _write(job, current, Phase.CANCELLED, session=session, reason=Reason.CANCELLED, message=message, now=now)


def reopen(
    job: Job,
    *,
    session: Session,
    from_step: int | None = None,
    message: str = "",
    now: datetime | None = None,
) -> None:
    """failed|cancelled -> restarting: resume an ended job from its newest checkpoint (or `from_step`'s).

    The restart budget starts over (`num_restarts_counted` = 0) and so does the crash-loop history: a person
    looked at the failure. The next launch happens on the next pass of the controller that claims the job.
    """
    now = now or utcnow()
    job = lock_job(session=session, job=job)
    current = job.phase
    if current not in REOPENABLE_FROM:
        allowed = ", ".join(sorted(REOPENABLE_FROM))
        raise InvalidTransition(
            job,
            current,
            Phase.RESTARTING,
            f"job {job.name!r} is {current}: only a job that is {allowed} can be reopened",
        )
    job.num_restarts_counted = 0
    job.resume_from_step = from_step
    job.next_attempt_at = now
    job.finished_at = None
    where = f"the checkpoint at step {from_step}" if from_step is not None else "the newest valid checkpoint"
    _write(
        job,
        current,
        Phase.RESTARTING,
        session=session,
        reason=REASON_RESUME_REQUESTED,
        message=message or f"resume requested from {where}",
        data={"from_step": from_step},
        now=now,
    )


def _guard(
    job: Job, target: Phase, *, session: Session, controller_id: str | None, now: datetime | None = None
) -> tuple[Job, Phase]:
    job = lock_job(session=session, job=job)
    if not can_transition(job.phase, target):
        raise InvalidTransition(job, job.phase, target)
    if controller_id is not None:
        require_claim(job, controller_id=controller_id, now=now)
    return job, job.phase


def _write(
    job: Job,
    current: Phase,
    target: Phase,
    *,
    session: Session,
    reason: str,
    message: str = "",
    data: Mapping[str, Any] | None = None,
    now: datetime,
) -> None:
    job.phase = target
    job.phase_reason = reason
    job.phase_message = message
    job.updated_at = now
    if target in TERMINAL_PHASES:
        job.finished_at = now
        job.claimed_by = None
        job.lease_expires_at = None
    append_event(
        session=session,
        job=job,
        type=EventType.PHASE_CHANGED,
        reason=reason,
        message=message,
        data={"from": current.value, "to": target.value, **(data or {})},
        attempt=job.current_attempt or None,
        now=now,
    )
