"""Goodput: how much of a job's wall time trained the model (ETTR), and where the rest went.

Decisions:

- ETTR (effective training time ratio) = productive training time / wall time since submission.
- The wall time is cut into consecutive intervals from the attempts' timestamps, so causes never overlap:
  submission -> first step of the first attempt: startup; failure -> the controller noticing it: detection;
  detection (or the end of an attempt) -> the next attempt's first step: restart (teardown, backoff, launch,
  checkpoint load, the first step's warm-up); first step -> failure or end: running.
- Running time is productive except for the deductions measured inside it: blocking checkpoint saves,
  straggler slowdown (per window, the slowest rank's own work minus the median rank's, times the steps: what
  everyone waited for), recomputed steps (steps repeated after resuming from a checkpoint older than the
  newest step reached before, priced at the attempt's median step time, or its mean when not given), and
  in-place recoveries (a lost rank replaced inside the attempt: from its death to every rank back at the
  snapshot step, plus the steps done again, priced like recomputed steps).
- Whatever no cause explains (the teardown after a job's final failure, gaps in the records) is `other`, so
  productive + lost + other = wall exactly.
- Inputs are small typed records the controller builds from its store, not database rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class LostCause(StrEnum):
    STARTUP = "startup"
    DETECTION = "detection"
    RESTART = "restart"
    RECOMPUTED_STEPS = "recomputed_steps"
    IN_PLACE_RECOVERY = "in_place_recovery"
    CHECKPOINT_STALL = "checkpoint_stall"
    STRAGGLER_SLOWDOWN = "straggler_slowdown"
    OTHER = "other"


@dataclass(kw_only=True, slots=True, frozen=True)
class StepWindow:
    num_steps: int
    median_own_work_seconds: float  # the median rank's
    slowest_own_work_seconds: float  # the slowest rank's

    def __post_init__(self) -> None:
        if self.num_steps < 0:
            raise ValueError(f"num_steps: must be >= 0, got {self.num_steps}")

    @property
    def excess_seconds(self) -> float:
        return self.num_steps * max(0.0, self.slowest_own_work_seconds - self.median_own_work_seconds)


@dataclass(kw_only=True, slots=True, frozen=True)
class InPlaceRecovery:
    """A lost rank replaced inside a running attempt (in-place recovery); unix seconds."""

    failed_at: float  # the rank's death as the controller saw it
    resumed_at: float  # every rank back at the snapshot step
    steps_lost: int = 0  # completed steps done again

    def __post_init__(self) -> None:
        if self.resumed_at < self.failed_at:
            raise ValueError(f"resumed_at: {self.resumed_at} is before failed_at ({self.failed_at})")
        if self.steps_lost < 0:
            raise ValueError(f"steps_lost: must be >= 0, got {self.steps_lost}")


@dataclass(kw_only=True, slots=True, frozen=True)
class AttemptTimeline:
    """One launch of the gang; times in unix seconds."""

    launched_at: float
    first_step_at: float | None = None  # its first step completed; None: it never completed one
    failed_at: float | None = (
        None  # the failure (a rank died; for a hang, the last progress); None: no failure
    )
    detected_at: float | None = None  # the controller noticed the failure (required with failed_at)
    ended_at: float | None = None  # its processes were gone; None: still running
    resumed_from_step: int = 0  # the checkpoint's step (0: from scratch)
    last_step: int | None = None  # highest step completed
    step_seconds: float | None = None  # median step time, to price recomputed steps
    checkpoint_stall_seconds: float = 0.0  # training blocked by checkpoint saves
    step_windows: tuple[StepWindow, ...] = ()
    recoveries: tuple[InPlaceRecovery, ...] = ()  # in-place recoveries inside the attempt's running time

    def __post_init__(self) -> None:
        if (self.failed_at is None) != (self.detected_at is None):
            raise ValueError("detected_at: set together with failed_at")
        order = [
            ("launched_at", self.launched_at),
            ("first_step_at", self.first_step_at),
            ("failed_at", self.failed_at),
            ("detected_at", self.detected_at),
            ("ended_at", self.ended_at),
        ]
        known = [(name, t) for name, t in order if t is not None]
        for (before, t0), (name, t1) in zip(known, known[1:], strict=False):
            if t1 < t0:
                raise ValueError(f"{name}: {t1} is before {before} ({t0})")
        if self.last_step is not None and self.last_step < self.resumed_from_step:
            raise ValueError(
                f"last_step: {self.last_step} is before resumed_from_step ({self.resumed_from_step})"
            )
        if self.checkpoint_stall_seconds < 0:
            raise ValueError(f"checkpoint_stall_seconds: must be >= 0, got {self.checkpoint_stall_seconds}")


def recorded_timeline(
    *,
    launched_at: float,
    first_step_at: float | None,
    failed_at: float | None,
    detected_at: float | None,
    ended_at: float | None,
    resumed_from_step: int,
    last_step: int | None,
    checkpoint_stall_seconds: float,
    straggler_seconds: float,
    recoveries: tuple[InPlaceRecovery, ...] = (),
) -> AttemptTimeline:
    """An AttemptTimeline from what the store recorded, made consistent: times come from different clocks
    (a rank's, torchrun's whole seconds, the controller's), so each is clamped to be no earlier than the one
    before it rather than rejected, and the measured straggler wait rides in one pseudo-window."""
    order = [launched_at]
    for t in (first_step_at, failed_at, detected_at, ended_at):
        order.append(None if t is None else max(t, max(x for x in order if x is not None)))
    _, first, failed, detected, ended = order
    if failed is not None and detected is None:
        detected = failed
    if failed is None:
        detected = None
    return AttemptTimeline(
        launched_at=launched_at,
        first_step_at=first,
        failed_at=failed,
        detected_at=detected,
        ended_at=ended,
        resumed_from_step=resumed_from_step,
        last_step=None if last_step is None else max(last_step, resumed_from_step),
        checkpoint_stall_seconds=max(0.0, checkpoint_stall_seconds),
        step_windows=(
            StepWindow(num_steps=1, median_own_work_seconds=0.0, slowest_own_work_seconds=straggler_seconds),
        ),
        recoveries=recoveries,
    )


@dataclass(frozen=True, slots=True)
class Goodput:
    wall_seconds: float
    productive_seconds: float
    startup_seconds: float
    detection_seconds: float
    restart_seconds: float
    recomputed_seconds: float
    in_place_recovery_seconds: float
    checkpoint_stall_seconds: float
    straggler_seconds: float
    other_seconds: float

    @property
    def ettr(self) -> float:
        return self.productive_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def lost_by_cause(self) -> dict[LostCause, float]:
        return {
            LostCause.STARTUP: self.startup_seconds,
            LostCause.DETECTION: self.detection_seconds,
            LostCause.RESTART: self.restart_seconds,
            LostCause.RECOMPUTED_STEPS: self.recomputed_seconds,
            LostCause.IN_PLACE_RECOVERY: self.in_place_recovery_seconds,
            LostCause.CHECKPOINT_STALL: self.checkpoint_stall_seconds,
            LostCause.STRAGGLER_SLOWDOWN: self.straggler_seconds,
            LostCause.OTHER: self.other_seconds,
        }


def compute_goodput(
    *, submitted_at: float, attempts: Sequence[AttemptTimeline], now: float, finished: bool = False
) -> Goodput:
    """`now`: the time of the report, or the job's end once it is over (`finished`); attempts in launch order.
    While the job goes on, the time after the last record is startup (not launched yet) or restart (between a
    failure's detection and the next launch)."""
    if now < submitted_at:
        raise ValueError(f"now: {now} is before submitted_at ({submitted_at})")
    lost = dict.fromkeys(LostCause, 0.0)
    productive = 0.0
    cursor = submitted_at  # end of the time accounted so far
    best_step = 0  # the newest step any earlier attempt reached
    for i, a in enumerate(attempts):
        if a.launched_at < cursor:
            raise ValueError(
                f"attempts[{i}].launched_at: {a.launched_at} is before the previous one ended ({cursor})"
            )
        stop = min(now, next(t for t in (a.failed_at, a.ended_at, now) if t is not None))
        before_first_step = LostCause.STARTUP if i == 0 else LostCause.RESTART
        if a.first_step_at is None or a.first_step_at >= now:
            lost[before_first_step] += stop - cursor
        else:
            lost[before_first_step] += a.first_step_at - cursor
            running = stop - a.first_step_at
            stall = a.checkpoint_stall_seconds
            straggler = sum(w.excess_seconds for w in a.step_windows)
            recomputed = recomputed_seconds(a, best_step, running)
            in_place, redone = in_place_seconds(a, start=a.first_step_at, stop=stop, running=running)
            lost[LostCause.CHECKPOINT_STALL] += stall
            lost[LostCause.STRAGGLER_SLOWDOWN] += straggler
            lost[LostCause.RECOMPUTED_STEPS] += recomputed + redone
            lost[LostCause.IN_PLACE_RECOVERY] += in_place
            productive += max(0.0, running - stall - straggler - recomputed - redone - in_place)
        cursor = stop
        if a.failed_at is not None and a.detected_at is not None and a.failed_at < now:
            detected = min(a.detected_at, now)
            lost[LostCause.DETECTION] += detected - a.failed_at
            cursor = detected
        best_step = max(best_step, a.last_step or 0)
    if not finished and cursor < now:
        lost[LostCause.STARTUP if not attempts else LostCause.RESTART] += now - cursor
    wall = now - submitted_at
    lost[LostCause.OTHER] = wall - productive - sum(v for k, v in lost.items() if k is not LostCause.OTHER)
    return Goodput(
        wall_seconds=wall,
        productive_seconds=productive,
        startup_seconds=lost[LostCause.STARTUP],
        detection_seconds=lost[LostCause.DETECTION],
        restart_seconds=lost[LostCause.RESTART],
        recomputed_seconds=lost[LostCause.RECOMPUTED_STEPS],
        in_place_recovery_seconds=lost[LostCause.IN_PLACE_RECOVERY],
        checkpoint_stall_seconds=lost[LostCause.CHECKPOINT_STALL],
        straggler_seconds=lost[LostCause.STRAGGLER_SLOWDOWN],
        other_seconds=lost[LostCause.OTHER],
    )


def in_place_seconds(a: AttemptTimeline, *, start: float, stop: float, running: float) -> tuple[float, float]:
    """The running time in-place recoveries took (a rank's death -> every rank back at the snapshot step, within
    [start, stop]) and the steps they did again, priced like recomputed steps."""
    took = sum(max(0.0, min(r.resumed_at, stop) - max(r.failed_at, start)) for r in a.recoveries)
    steps = sum(r.steps_lost for r in a.recoveries if r.resumed_at <= stop)
    if not steps:
        return took, 0.0
    step_seconds = a.step_seconds
    if step_seconds is None:
        done = (a.last_step or 0) - a.resumed_from_step
        step_seconds = running / done if done > 0 else 0.0
    return took, min(max(0.0, running - took), steps * step_seconds)


def recomputed_seconds(a: AttemptTimeline, best_step: int, running: float) -> float:
    """Time this attempt spent on steps an earlier attempt had already completed."""
    if a.last_step is None:
        return 0.0
    repeated = max(0, min(best_step, a.last_step) - a.resumed_from_step)
    if not repeated:
        return 0.0
    step_seconds = a.step_seconds
    if step_seconds is None:
        step_seconds = running / (a.last_step - a.resumed_from_step)
    return min(running, repeated * step_seconds)
