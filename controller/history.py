"""What a job's records say, for the decisions the reconcile loop makes: its failure history (the restart
policy's input, with `record_failure` writing each entry), its checkpoint interval when `auto`, the cost of a
restart (for excluding a node), and its goodput. Each function reads the store through the caller's session and
writes nothing but what it says; the decisions themselves are `controller.policy`'s pure functions.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller import states
from controller.domain.phases import EventType, SupervisionReason
from controller.failures import Classification, ExitClass
from controller.goodput import InPlaceRecovery, compute_goodput, recorded_timeline
from controller.policy import CheckpointIntervalInputs, RestartCost, choose_checkpoint_interval
from controller.spec import TrainingJobSpec
from controller.store.models import Attempt, Checkpoint, Event, Job
from controller.store.records import record_goodput
from controller.store.repo import append_event, get_current_attempt, list_attempts

log = logging.getLogger(__name__)

REASON_CHECKPOINT_INTERVAL = "CheckpointInterval"
DEFAULT_LAUNCH_SECONDS = 60.0  # a restart's launch cost before this job has measured one


def record_failure(
    *, session: Session, job: Job, result: Classification, failed_at: float, detected_at: float
) -> None:
    """Record how the job's current attempt failed: its classification in the attempt's columns (what
    `failure_history` reads back), and a Failure event with the same facts for people to read.

    `failed_at`: when it failed (a rank died, or the hang's limit passed), at most `detected_at`, when the
    controller noticed."""
    failed_at = min(failed_at, detected_at)
    attempt = get_current_attempt(session=session, job=job)
    if attempt is not None:
        attempt.exit_class = result.reason  # the state machine writes the same when it ends the attempt
        attempt.retryable = result.retryable
        attempt.counts_toward_limit = result.counts_toward_limit
        attempt.failure_step = result.step
        attempt.failure_message = result.message
        attempt.failed_at = datetime.fromtimestamp(failed_at, UTC)
        attempt.detected_at = datetime.fromtimestamp(detected_at, UTC)
    append_event(
        session=session,
        job=job,
        type=EventType.FAILURE,
        reason=result.reason,
        message=result.message,
        data={
            "exit_class": result.reason,
            "retryable": result.retryable,
            "counts_toward_limit": result.counts_toward_limit,
            "step": result.step,
            "ranks": list(result.ranks),
            "rule": result.rule,
            "detection_seconds": detected_at - failed_at,
        },
        attempt=job.current_attempt,
        now=datetime.fromtimestamp(detected_at, UTC),
    )


def failure_history(*, session: Session, job: Job) -> list[Classification]:
    """The classification of every failed attempt since the job was last (re)opened, oldest first.

    A person reopening the job (`states.reopen`) starts the crash-loop guard over: its PhaseChanged event names
    the attempt it followed, and only later attempts count."""
    reopened_after = session.scalar(
        select(func.max(Event.attempt)).where(
            Event.job_id == job.id,
            Event.type == EventType.PHASE_CHANGED,
            Event.reason == states.REASON_RESUME_REQUESTED,
        )
    )
    attempts = session.scalars(
        select(Attempt)
        .where(
            Attempt.job_id == job.id,
            Attempt.number > (reopened_after or 0),
            # A classified failure: not a success, a cancel or an interrupted launch (nor a running attempt).
            Attempt.retryable.is_not(None),
        )
        .order_by(Attempt.number)
    )
    return [
        Classification(
            exit_class=_exit_class(a.exit_class),
            message=a.failure_message or "",
            retryable=bool(a.retryable),
            counts_toward_limit=bool(a.counts_toward_limit),
            step=a.failure_step,
            trained_seconds=_trained_seconds(a),
        )
        for a in attempts
    ]


def _exit_class(value: str | None) -> ExitClass:
    try:
        return ExitClass(value)
    except ValueError:  # a class this version does not know (written by a newer controller)
        return ExitClass.UNKNOWN


def checkpoint_interval(*, session: Session, job: Job, spec: TrainingJobSpec, now: float) -> int:
    """The interval the next attempt checkpoints at: the spec's, or with `auto` what `policy` chooses from the
    measured save time and the job's failure rate (a Decision event with its numbers when Young/Daly chose)."""
    setting = spec.checkpoint_policy.interval
    if setting != "auto":
        return int(setting)
    attempts = list_attempts(session=session, job_id=job.id)
    step_seconds = median([mean_step_seconds(a) for a in attempts])
    saves = session.scalars(
        select(Checkpoint.save_seconds).where(
            Checkpoint.job_id == job.id, Checkpoint.save_seconds.is_not(None)
        )
    ).all()
    save = median(list(saves))
    failures = sum(1 for a in attempts if a.failed_at is not None)
    observed = sum(
        ((a.ended_at or datetime.fromtimestamp(now, UTC)) - a.started_at).total_seconds()
        for a in attempts
        if a.started_at
    )
    choice = choose_checkpoint_interval(
        CheckpointIntervalInputs(
            setting=setting,
            trainer_interval_steps=spec.training.checkpoint.interval_steps,
            median_step_seconds=step_seconds,
            save_seconds=save,
            num_failures=failures,
            observed_seconds=observed,
            policy=spec.checkpoint_interval_policy(),
        )
    )
    auto, trainer = choice.auto, spec.training.checkpoint.interval_steps
    measured = {"step_seconds": step_seconds, "failures": failures, "observed_seconds": observed}
    if auto is not None:
        assert step_seconds is not None and save is not None  # Young/Daly chose: both were measured
        message = (
            f"checkpoint every {auto.steps} steps: sqrt(2 x {save:.2f} s save x {auto.mtbf_seconds:.0f} s "
            f"MTBF) = {auto.interval_seconds:.0f} s at {step_seconds:.2f} s/step"
            + (" (clamped)" if auto.clamped else "")
        )
        data = {
            "steps": auto.steps,
            "optimal_steps": auto.optimal_steps,
            "interval_seconds": auto.interval_seconds,
            "mtbf_seconds": auto.mtbf_seconds,
            "save_seconds": save,
            **measured,
        }
    elif choice.cut_to_mtbf_seconds is not None:
        assert step_seconds is not None  # the cut needs a step time
        message = (
            f"checkpoint every {choice.steps} steps, not the trainer's {trainer}: no save measured yet, and half "
            f"the MTBF so far ({choice.cut_to_mtbf_seconds:.0f} s over {failures} failure(s)) at "
            f"{step_seconds:.2f} s/step, so that a save commits before the next failure and Young/Daly can take over"
        )
        data = {
            "steps": choice.steps,
            "mtbf_seconds": choice.cut_to_mtbf_seconds,
            "trainer_interval_steps": trainer,
            **measured,
        }
    else:
        return choice.steps  # nothing measured yet: the trainer's own setting, within bounds
    append_event(
        session=session,
        job=job,
        type=EventType.DECISION,
        reason=REASON_CHECKPOINT_INTERVAL,
        message=message,
        data=data,
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
        recoveries = in_place_recoveries(session=session, job_id=job.id)
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
                recoveries=recoveries.get(a.number, ()),
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


def in_place_recoveries(*, session: Session, job_id: int) -> dict[int, tuple[InPlaceRecovery, ...]]:
    """Each attempt's finished in-place recoveries, from their RecoveredInPlace events."""
    out: dict[int, list[InPlaceRecovery]] = {}
    rows = session.execute(
        select(Event.attempt, Event.data).where(
            Event.job_id == job_id,
            Event.type == EventType.RECOVERY,
            Event.reason == SupervisionReason.RECOVERED_IN_PLACE,
        )
    )
    for attempt, data in rows:
        if attempt is None or not data or data.get("died_at") is None or data.get("resumed_at") is None:
            continue
        out.setdefault(int(attempt), []).append(
            InPlaceRecovery(
                failed_at=float(data["died_at"]),
                resumed_at=max(float(data["resumed_at"]), float(data["died_at"])),
                steps_lost=int(data.get("steps_lost") or 0),
            )
        )
    return {k: tuple(v) for k, v in out.items()}


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


def _trained_seconds(attempt: Attempt) -> float | None:
    """From the attempt's first step to its failure (or its end), for the backoff's reset."""
    end = attempt.failed_at or attempt.ended_at
    if attempt.first_step_at is None or end is None:
        return None
    return max(0.0, (end - attempt.first_step_at).total_seconds())
