"""Decisions on a failed or slow job: restart or stop, how long to wait, how often to checkpoint, whether
excluding a straggler node pays.

Decisions:

- Restarts (JobSet failurePolicy style): a non-retryable class stops the job with its own reason. Then the
  crash-loop guard: when the same class ends an attempt at the same step for the `crash_loop_limit`-th time
  (before the first step: `startup_crash_limit`, default 2, so one retry), the job stops as `CrashLoop`, or as
  `UserError` for CrashBeforeFirstStep, without burning the remaining restarts on a deterministic failure. Only
  failures that count toward the limit feed the guard: two preemptions at one step are bad luck, not a loop.
  Then `max_restarts` over counted failures (`ReachedMaxRestarts`), else a restart.
- Backoff: restart n waits a uniform draw from [(1 - jitter) x d, d], d = min(backoff_max_seconds,
  backoff_base_seconds x 2^(n-1)), so it never exceeds the maximum and controllers restarting many jobs do not
  restart them in lockstep. n counts the counted failures since the last attempt that trained for
  `backoff_reset_seconds` (10 minutes, as Kubernetes resets a container's crash-loop back-off), at least 1: a job
  that fails now and then after hours of training restarts after the base delay, not after the maximum forever
  (`vlctl simulate` at 16,384 GPUs: the backoff had become most of every restart, docs/scale.md). The draw `u` is
  an argument: the function stays pure.
- Crashes before the first step are counted in a row: an attempt that completed a step in between starts the
  count again (a start-up crash now and then in a weeks-long job is not a user error).
- Checkpoint interval `auto`: Young's optimum sqrt(2 C M), C the measured blocking save time, M the mean time
  between failures. M = (observed seconds + prior_failures x prior_mtbf_seconds) / (failures + prior_failures):
  a Gamma prior worth `prior_failures` failures, so a job without failures yet gets the prior, not infinity,
  and the data take over as failures accumulate. The prior is one failure a day unless the spec says what to
  expect (`checkpoint_policy.expected_failures_per_day`): at 131,072 GPUs the one-a-day prior kept the first
  intervals far too long (`vlctl simulate`: 84% ETTR against 94% with the failure model's rate, docs/scale.md). Daly's higher-order terms differ by under 1% when C < M/50.
  Converted to steps with the median step time and clamped to [min_interval_steps, max_interval_steps].
- Checkpoint interval in effect: the spec's number when it gives one; with `auto`, the trainer's own setting
  (within the policy's bounds) until a step time and a save time are measured, Young/Daly after. Before a save
  is measured, once the job has failed, the trainer's interval is cut to half the MTBF so far (a save then
  commits before the next failure with probability e^-1/2 = 61%): when failures come faster than the trainer's
  interval no save would ever be measured, Young/Daly would never engage and every attempt would restart from
  the same checkpoint (the fleet simulator at 131,072 GPUs with a 1,000-step trainer interval: 54% ETTR).
- Exclude a straggler node only if staying costs more than leaving: staying runs the remaining steps at the
  slowed pace; leaving pays detection + teardown + launch + checkpoint load, recomputes the steps since the
  last checkpoint, and runs everything at `throughput_after` (1 with a spare node, (dp-1)/dp when the
  data-parallel size shrinks). The node stays, whatever the weighing would say, when there is no spare at
  dp=1 (the job would lose its only replica: there is no throughput after to weigh) or when the backend could
  not place the next attempt without it (the gang never shrinks: excluding would fail the job with
  NotEnoughNodes instead of speeding it up).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from controller.failures import Classification, ExitClass
from controller.stragglers import StragglerReport

REASON_CRASH_LOOP = "CrashLoop"
REASON_MAX_RESTARTS = "ReachedMaxRestarts"
REASON_USER_ERROR = ExitClass.USER_ERROR.value


@dataclass(kw_only=True, slots=True)
class RestartPolicy:
    max_restarts: int = 3  # failures that count toward the limit, before the job fails
    backoff_base_seconds: float = 5.0
    backoff_max_seconds: float = 300.0
    backoff_jitter: float = 0.25  # fraction of the delay drawn at random
    crash_loop_limit: int = 3  # same class at the same step this many times: stop
    startup_crash_limit: int = 2  # same class before the first step this many times in a row: stop
    backoff_reset_seconds: float = 600.0  # an attempt that trained this long starts the backoff over

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        for name in ("crash_loop_limit", "startup_crash_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.backoff_base_seconds >= 0:
            raise ValueError(f"backoff_base_seconds: must be >= 0, got {self.backoff_base_seconds}")
        if not self.backoff_max_seconds >= self.backoff_base_seconds:
            raise ValueError(
                f"backoff_max_seconds: must be >= backoff_base_seconds ({self.backoff_base_seconds}), "
                f"got {self.backoff_max_seconds}"
            )
        if not self.backoff_reset_seconds >= 0:
            raise ValueError(f"backoff_reset_seconds: must be >= 0, got {self.backoff_reset_seconds}")
        if not 0 <= self.backoff_jitter <= 1:
            raise ValueError(f"backoff_jitter: must be in [0, 1], got {self.backoff_jitter}")


@dataclass(frozen=True, slots=True)
class RestartDecision:
    restart: bool
    reason: str  # the attempt's class, or CrashLoop / UserError / ReachedMaxRestarts when the policy stops it
    message: str
    delay_seconds: float  # 0 unless restart
    num_restarts: int  # restarts of the job, this one included
    num_counted_restarts: int  # those that count toward max_restarts


def backoff_bounds(restart: int, policy: RestartPolicy) -> tuple[float, float]:
    if restart < 1:
        raise ValueError(f"restart: must be >= 1, got {restart}")
    # 2**(restart-1) overflows float for absurd counts; the cap is reached long before.
    nominal = min(policy.backoff_max_seconds, policy.backoff_base_seconds * 2.0 ** min(restart - 1, 1000))
    return nominal * (1 - policy.backoff_jitter), nominal


def backoff_seconds(restart: int, policy: RestartPolicy, *, u: float) -> float:
    """`u` in [0, 1): a uniform random draw."""
    if not 0 <= u <= 1:
        raise ValueError(f"u: must be in [0, 1], got {u}")
    low, high = backoff_bounds(restart, policy)
    return low + u * (high - low)


def decide_restart(history: Sequence[Classification], policy: RestartPolicy, *, u: float) -> RestartDecision:
    """`history`: the classification of every attempt of the job so far, oldest first; the last one just ended
    (every earlier one was restarted)."""
    if not history:
        raise ValueError("history: needs the attempt that just ended")
    latest = history[-1]
    restarted_before = len(history) - 1
    counted_before = sum(c.counts_toward_limit for c in history[:-1])

    def stop(reason: str, message: str) -> RestartDecision:
        return RestartDecision(False, reason, message, 0.0, restarted_before, counted_before)

    if not latest.retryable:
        return stop(latest.reason, latest.message)
    if latest.counts_toward_limit:
        # At a step: over the whole history (the same step again means no progress in between); before the
        # first step: since the last attempt that completed one.
        since = (
            history
            if latest.step is not None
            else history[_after_last(history, lambda c: c.step is not None) :]
        )
        same = sum(
            c.counts_toward_limit and c.exit_class is latest.exit_class and c.step == latest.step
            for c in since
        )
        limit = policy.startup_crash_limit if latest.step is None else policy.crash_loop_limit
        if same >= limit:
            where = "before the first step" if latest.step is None else f"at step {latest.step}"
            message = f"{latest.reason} {same} times {where}; last: {latest.message}"
            if latest.exit_class is ExitClass.CRASH_BEFORE_FIRST_STEP:
                return stop(REASON_USER_ERROR, message)
            return stop(REASON_CRASH_LOOP, message)
    counted = counted_before + latest.counts_toward_limit
    if counted > policy.max_restarts:
        return stop(
            REASON_MAX_RESTARTS,
            f"{counted} failures exceed max_restarts={policy.max_restarts}; last: {latest.message}",
        )
    trained = _after_last(
        history, lambda c: c.trained_seconds is not None and c.trained_seconds >= policy.backoff_reset_seconds
    )
    delay = backoff_seconds(max(sum(c.counts_toward_limit for c in history[trained:]), 1), policy, u=u)
    message = f"restarting in {delay:.1f} s after {latest.reason}: {latest.message}"
    return RestartDecision(True, latest.reason, message, delay, restarted_before + 1, counted)


def _after_last(history: Sequence[Classification], went_well: Callable[[Classification], bool]) -> int:
    """The index just after the last attempt for which `went_well` holds (0 when none did)."""
    for index in range(len(history) - 1, -1, -1):
        if went_well(history[index]):
            return index + 1
    return 0


# ------------------------------------------------------------------------------------- checkpoint interval


@dataclass(kw_only=True, slots=True)
class CheckpointIntervalPolicy:
    min_interval_steps: int = 50
    max_interval_steps: int = 5000
    prior_mtbf_seconds: float = 24 * 3600.0  # before the job has failed: one failure a day
    prior_failures: float = 1.0  # weight of the prior, in failures

    def __post_init__(self) -> None:
        if self.min_interval_steps < 1:
            raise ValueError(f"min_interval_steps: must be >= 1, got {self.min_interval_steps}")
        if self.max_interval_steps < self.min_interval_steps:
            raise ValueError(
                f"max_interval_steps: must be >= min_interval_steps ({self.min_interval_steps}), "
                f"got {self.max_interval_steps}"
            )
        for name in ("prior_mtbf_seconds", "prior_failures"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class CheckpointInterval:
    steps: int  # what to use
    optimal_steps: float  # before clamping
    interval_seconds: float  # sqrt(2 C M)
    mtbf_seconds: float
    save_seconds: float
    clamped: bool


def estimate_mtbf_seconds(
    num_failures: int, observed_seconds: float, policy: CheckpointIntervalPolicy
) -> float:
    prior = policy.prior_failures
    return (observed_seconds + prior * policy.prior_mtbf_seconds) / (num_failures + prior)


def auto_checkpoint_interval(
    *,
    save_seconds: float,
    median_step_seconds: float,
    num_failures: int,
    observed_seconds: float,
    policy: CheckpointIntervalPolicy,
) -> CheckpointInterval:
    """`num_failures` over `observed_seconds` of the job's wall time: failures that lose work (crash, hang,
    OOM, lost node, preemption without a save)."""
    if not save_seconds >= 0:
        raise ValueError(f"save_seconds: must be >= 0, got {save_seconds}")
    if not median_step_seconds > 0:
        raise ValueError(f"median_step_seconds: must be > 0, got {median_step_seconds}")
    if num_failures < 0:
        raise ValueError(f"num_failures: must be >= 0, got {num_failures}")
    if not observed_seconds >= 0:
        raise ValueError(f"observed_seconds: must be >= 0, got {observed_seconds}")
    mtbf = estimate_mtbf_seconds(num_failures, observed_seconds, policy)
    interval = math.sqrt(2 * save_seconds * mtbf)
    optimal = interval / median_step_seconds
    steps = min(max(round(optimal), policy.min_interval_steps), policy.max_interval_steps)
    clamped = not policy.min_interval_steps <= optimal <= policy.max_interval_steps
    return CheckpointInterval(steps, optimal, interval, mtbf, save_seconds, clamped)


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointIntervalInputs:
    """What the interval in effect is chosen from: the spec's setting and what the job has measured so far."""

    setting: int | Literal["auto"]  # the spec's `checkpoint_policy.interval`
    trainer_interval_steps: int  # the training config's own interval: `auto`'s answer before any measurement
    median_step_seconds: float | None  # None: no attempt has measured its step time yet
    save_seconds: float | None  # median blocking save; None: no save measured yet
    num_failures: int  # attempts that failed, over...
    observed_seconds: float  # ...the job's wall time in attempts
    policy: CheckpointIntervalPolicy


@dataclass(frozen=True, slots=True)
class CheckpointIntervalChoice:
    steps: int
    # Young/Daly's numbers when they chose `steps` (worth a Decision event); None for a fixed or default interval.
    auto: CheckpointInterval | None
    # No save measured yet, and the trainer's interval cut to half the MTBF so far: that MTBF (worth an event).
    cut_to_mtbf_seconds: float | None = None


def choose_checkpoint_interval(inputs: CheckpointIntervalInputs) -> CheckpointIntervalChoice:
    """The interval the next attempt checkpoints at (see the module docstring)."""
    if inputs.setting != "auto":
        return CheckpointIntervalChoice(int(inputs.setting), None)
    policy = inputs.policy
    if inputs.median_step_seconds is None or inputs.save_seconds is None:
        steps = min(max(inputs.trainer_interval_steps, policy.min_interval_steps), policy.max_interval_steps)
        if inputs.median_step_seconds is None or inputs.num_failures == 0:
            return CheckpointIntervalChoice(steps, None)
        mtbf = estimate_mtbf_seconds(inputs.num_failures, inputs.observed_seconds, policy)
        reach = max(int(mtbf / 2 / inputs.median_step_seconds), policy.min_interval_steps)
        if reach >= steps:
            return CheckpointIntervalChoice(steps, None)
        return CheckpointIntervalChoice(reach, None, cut_to_mtbf_seconds=mtbf)
    auto = auto_checkpoint_interval(
        save_seconds=inputs.save_seconds,
        median_step_seconds=inputs.median_step_seconds,
        num_failures=inputs.num_failures,
        observed_seconds=inputs.observed_seconds,
        policy=policy,
    )
    return CheckpointIntervalChoice(auto.steps, auto)


# ----------------------------------------------------------------------------------------- exclude a node


@dataclass(kw_only=True, slots=True)
class RestartCost:
    """Measured on this job's earlier restarts (or the recovery benchmark), in seconds."""

    detection_seconds: float = 0.0  # a planned exclusion has none; failures pay the time to notice
    teardown_seconds: float
    launch_seconds: float
    load_seconds: float  # checkpoint load

    def __post_init__(self) -> None:
        for name in ("detection_seconds", "teardown_seconds", "launch_seconds", "load_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")

    @property
    def fixed_seconds(self) -> float:
        return self.detection_seconds + self.teardown_seconds + self.launch_seconds + self.load_seconds


@dataclass(frozen=True, slots=True)
class ExcludeNodeDecision:
    exclude: bool
    node: str
    saved_seconds: float  # remaining time staying - remaining time after excluding, before paying the restart
    cost_seconds: float  # the restart's fixed costs + recomputed steps
    numbers: dict[str, float]  # every input and intermediate, for the event
    message: str


def decide_exclude_node(
    *,
    node: str,
    slowdown_fraction: float,
    remaining_steps: int,
    step_seconds: float,
    steps_since_checkpoint: int,
    cost: RestartCost,
    throughput_after: float = 1.0,
) -> ExcludeNodeDecision:
    """`slowdown_fraction`: 0.3 when steps take 1.3x the healthy `step_seconds` because of the node."""
    if not slowdown_fraction >= 0:
        raise ValueError(f"slowdown_fraction: must be >= 0, got {slowdown_fraction}")
    if remaining_steps < 0 or steps_since_checkpoint < 0:
        raise ValueError("remaining_steps, steps_since_checkpoint: must be >= 0")
    if not step_seconds > 0:
        raise ValueError(f"step_seconds: must be > 0, got {step_seconds}")
    if not 0 < throughput_after <= 1:
        raise ValueError(f"throughput_after: must be in (0, 1], got {throughput_after}")
    after_step = step_seconds / throughput_after
    stay = remaining_steps * step_seconds * (1 + slowdown_fraction)
    saved = stay - remaining_steps * after_step
    recompute = steps_since_checkpoint * after_step
    total_cost = cost.fixed_seconds + recompute
    exclude = saved > total_cost
    numbers = {
        "slowdown_fraction": slowdown_fraction,
        "remaining_steps": float(remaining_steps),
        "step_seconds": step_seconds,
        "throughput_after": throughput_after,
        "steps_since_checkpoint": float(steps_since_checkpoint),
        "detection_seconds": cost.detection_seconds,
        "teardown_seconds": cost.teardown_seconds,
        "launch_seconds": cost.launch_seconds,
        "load_seconds": cost.load_seconds,
        "recompute_seconds": recompute,
        "saved_seconds": saved,
        "cost_seconds": total_cost,
    }
    verdict = "excluding" if exclude else "keeping"
    message = (
        f"{verdict} node {node}: {slowdown_fraction:.0%} slower over {remaining_steps} remaining steps "
        f"would cost {saved:.0f} s, a restart costs {total_cost:.0f} s"
    )
    return ExcludeNodeDecision(exclude, node, saved, total_cost, numbers, message)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExclusionCase:
    """Everything the exclusion of a straggler's node is decided on, gathered by the reconcile loop."""

    report: StragglerReport  # the slowest flagged rank: its node is the one considered, its slowdown the gain
    step: int  # steps the job has done
    total_steps: int  # the job's `training.steps`
    step_seconds: float  # the job's median step time now, at the slowed pace
    cost: RestartCost
    dp: int  # data-parallel replicas
    spare_nodes_left: int  # spare nodes that no exclusion has taken yet
    placeable: bool  # the backend can place the next attempt without the node

    def __post_init__(self) -> None:
        if not self.step_seconds > 0:
            raise ValueError(f"step_seconds: must be > 0, got {self.step_seconds}")
        if self.dp < 1:
            raise ValueError(f"dp: must be >= 1, got {self.dp}")
        if self.spare_nodes_left < 0:
            raise ValueError(f"spare_nodes_left: must be >= 0, got {self.spare_nodes_left}")


def decide_exclusion(case: ExclusionCase) -> ExcludeNodeDecision:
    """Exclude the slow node or keep it, always with the reason and the numbers (see the module docstring)."""
    node = case.report.node
    slowdown = max(0.0, case.report.slowdown - 1.0)
    remaining = max(0, case.total_steps - case.step)
    spare = case.spare_nodes_left > 0
    context = {"dp": float(case.dp), "spare_nodes_left": float(case.spare_nodes_left)}
    if not spare and case.dp < 2:
        numbers = {
            "slowdown_fraction": slowdown,
            "remaining_steps": float(remaining),
            "step_seconds": case.step_seconds / (1 + slowdown),
            "throughput_after": 0.0,
            "cost_seconds": case.cost.fixed_seconds,
            **context,
        }
        message = f"keeping node {node}: no spare node and data parallelism cannot shrink (dp={case.dp})"
        return ExcludeNodeDecision(False, node, 0.0, case.cost.fixed_seconds, numbers, message)
    decision = decide_exclude_node(
        node=node,
        slowdown_fraction=slowdown,
        remaining_steps=remaining,
        step_seconds=case.step_seconds / (1 + slowdown),  # the healthy pace, once the node is gone
        steps_since_checkpoint=0,  # the graceful stop (SIGTERM) saves at the current step
        cost=case.cost,
        throughput_after=1.0 if spare else (case.dp - 1) / case.dp,
    )
    decision = replace(decision, numbers={**decision.numbers, **context})
    if decision.exclude and not case.placeable:
        return replace(
            decision,
            exclude=False,
            message=f"keeping node {node}: without it the next attempt would have too few nodes (no spare left)",
        )
    return decision
