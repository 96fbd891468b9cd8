"""What a job's records say, for the decisions the reconcile loop makes: its failure history (the restart
policy's input), its checkpoint interval when `auto`, the cost of a restart (for excluding a node), and its
goodput. Each function reads the store through the caller's session and writes nothing but what it says.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import states
from controller.domain.phases import EventType
from controller.failures import Classification, ExitClass
from controller.goodput import compute_goodput, recorded_timeline
from controller.policy import RestartCost, auto_checkpoint_interval
from controller.spec import TrainingJobSpec
from controller.store.models import Attempt, Checkpoint, Event, Job
from controller.store.records import record_goodput
from controller.store.repo import append_event, list_attempts

log = logging.getLogger(__name__)

REASON_CHECKPOINT_INTERVAL = "CheckpointInterval"
DEFAULT_LAUNCH_SECONDS = 60.0  # a restart's launch cost before this job has measured one


def failure_history(*, session: Session, job: Job) -> list[Classification]:
    """Every attempt's classification since the job was (re)opened, oldest first, from its Failure events."""
    events = session.scalars(
        select(Event)
        .where(Event.job_id == job.id, Event.type.in_([EventType.FAILURE, EventType.PHASE_CHANGED]))
        .order_by(Event.seq)
    ).all()
    history: list[Classification] = []
    for e in events:
        if e.type == EventType.PHASE_CHANGED and e.reason == states.REASON_RESUME_REQUESTED:
            history.clear()  # a person reopened the job: the crash-loop guard starts over
        elif e.type == EventType.FAILURE and e.data and "exit_class" in e.data:
            try:
                exit_class = ExitClass(e.data["exit_class"])
            except ValueError:
                exit_class = ExitClass.UNKNOWN
            history.append(
                Classification(
                    exit_class=exit_class,
                    message=e.message,
                    retryable=bool(e.data.get("retryable", True)),
                    counts_toward_limit=bool(e.data.get("counts_toward_limit", True)),
                    step=e.data.get("step"),
                )
            )
    return history


def checkpoint_interval(*, session: Session, job: Job, spec: TrainingJobSpec, now: float) -> int:
    """The spec's interval, or `auto`: Young/Daly from the measured save time and the job's failure rate
    (recorded as a Decision event with its numbers)."""
    policy = spec.checkpoint_policy
    if policy.interval != "auto":
        return int(policy.interval)
    attempts = list_attempts(session=session, job_id=job.id)
    step_seconds = median([mean_step_seconds(a) for a in attempts])
    saves = session.scalars(
        select(Checkpoint.save_seconds).where(
            Checkpoint.job_id == job.id, Checkpoint.save_seconds.is_not(None)
        )
    ).all()
    save = median(list(saves))
    if step_seconds is None or save is None:
        # Nothing measured yet: the trainer's own setting, within the policy's bounds.
        steps = spec.training.checkpoint.interval_steps
        return min(max(steps, policy.min_interval_steps), policy.max_interval_steps)
    failures = sum(1 for a in attempts if a.failed_at is not None)
    observed = sum(
        ((a.ended_at or datetime.fromtimestamp(now, UTC)) - a.started_at).total_seconds()
        for a in attempts
        if a.started_at
    )
    choice = auto_checkpoint_interval(
        save_seconds=save,
        median_step_seconds=step_seconds,
        num_failures=failures,
        observed_seconds=observed,
        policy=spec.checkpoint_interval_policy(),
    )
    append_event(
        session=session,
        job=job,
        type=EventType.DECISION,
        reason=REASON_CHECKPOINT_INTERVAL,
        message=(
            f"checkpoint every {choice.steps} steps: sqrt(2 x {save:.2f} s save x {choice.mtbf_seconds:.0f} s "
            f"MTBF) = {choice.interval_seconds:.0f} s at {step_seconds:.2f} s/step"
            + (" (clamped)" if choice.clamped else "")
        ),
        data={
            "steps": choice.steps,
            "optimal_steps": choice.optimal_steps,
            "interval_seconds": choice.interval_seconds,
            "mtbf_seconds": choice.mtbf_seconds,
            "save_seconds": save,
            "step_seconds": step_seconds,
            "failures": failures,
            "observed_seconds": observed,
        },
    )
    return choice.steps


def restart_cost(*, session: Session, job: Job, teardown_seconds: float) -> RestartCost:
    """Measured on this job's earlier attempts: launch to first step covers the launch, the checkpoint load
    and the first step's warm-up."""
    starts = [
        (a.first_step_at - a.started_at).total_seconds()
        for a in list_attempts(session=session, job_id=job.id)
        if a.first_step_at is not None and a.started_at is not None
    ]
    launch = median(starts) or DEFAULT_LAUNCH_SECONDS
    return RestartCost(teardown_seconds=teardown_seconds, launch_seconds=launch, load_seconds=0.0)


def update_goodput(*, session: Session, job: Job, now: float, finished: bool = False) -> None:
    """Recompute the job's ETTR and lost time by cause from its attempts, and store them."""
    end = job.finished_at.timestamp() if finished and job.finished_at else now
    try:
        timelines = [
            recorded_timeline(
                launched_at=a.started_at.timestamp(),
                first_step_at=_ts(a.first_step_at),
                failed_at=_ts(a.failed_at),
                detected_at=_ts(a.detected_at),
                ended_at=_ts(a.ended_at),
                resumed_from_step=a.resumed_from_step or 0,
                last_step=a.last_step,
                checkpoint_stall_seconds=a.checkpoint_stall_seconds,
                straggler_seconds=a.straggler_seconds,
            )
            for a in list_attempts(session=session, job_id=job.id)
        ]
        g = compute_goodput(
            submitted_at=job.created_at.timestamp(),
            attempts=timelines,
            now=max(end, job.created_at.timestamp()),
            finished=finished,
        )
    except ValueError as err:  # inconsistent records: never let accounting stop the loop
        log.warning("job %s: goodput not computed: %s", job.name, err)
        return
    record_goodput(
        session=session,
        job=job,
        productive_seconds=g.productive_seconds,
        lost_seconds={str(k): v for k, v in g.lost_by_cause().items()},
        ettr=min(1.0, max(0.0, g.ettr)),
    )


def median(values: list[float | None]) -> float | None:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def mean_step_seconds(a: Attempt) -> float | None:
    """An ended attempt's mean step time, from its first completed step to its end."""
    if a.first_step_at is None or a.last_step is None:
        return None
    first = a.resumed_from_step or 0
    steps = a.last_step - first - 1  # the first step's time is before first_step_at
    end = a.failed_at or a.ended_at
    if steps < 1 or end is None:
        return None
    return max(0.0, (end - a.first_step_at).total_seconds()) / steps


def _ts(d: datetime | None) -> float | None:
    return None if d is None else d.timestamp()
