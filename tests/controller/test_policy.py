"""Restart policy, crash-loop guard, Young/Daly checkpoint interval (and the interval in effect) and the
exclude-node trade-off with the cases that keep the node unweighed, each with numbers worked by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from controller.failures import AttemptEnd, Classification, ExitClass, RankExit, classify
from controller.policy import (
    REASON_CRASH_LOOP,
    REASON_MAX_RESTARTS,
    REASON_USER_ERROR,
    CheckpointIntervalInputs,
    CheckpointIntervalPolicy,
    ExclusionCase,
    RestartCost,
    RestartPolicy,
    auto_checkpoint_interval,
    backoff_bounds,
    backoff_seconds,
    choose_checkpoint_interval,
    decide_exclude_node,
    decide_exclusion,
    decide_restart,
    estimate_mtbf_seconds,
)
from controller.stragglers import StragglerReport

POLICY = RestartPolicy(max_restarts=3, backoff_base_seconds=10, backoff_max_seconds=60, backoff_jitter=0.5)


def failure(cls: ExitClass, step: int | None, *, counts: bool = True, retry: bool = True) -> Classification:
    return Classification(cls, f"{cls.value} happened", retry, counts, step)


CRASH = ExitClass.CRASH


def test_backoff_doubles_to_the_cap_with_jitter_below_the_nominal_delay():
    assert [backoff_bounds(n, POLICY) for n in (1, 2, 3, 4, 50_000)] == [
        (5, 10),
        (10, 20),
        (20, 40),
        (30, 60),
        (30, 60),
    ]
    assert backoff_seconds(2, POLICY, u=0.0) == 10 and backoff_seconds(2, POLICY, u=1.0) == 20
    assert backoff_seconds(2, POLICY, u=0.5) == 15
    with pytest.raises(ValueError, match="^restart:"):
        backoff_bounds(0, POLICY)
    with pytest.raises(ValueError, match="^u:"):
        backoff_seconds(1, POLICY, u=1.5)


def test_retryable_failures_restart_with_growing_delay_until_the_limit():
    history = [failure(CRASH, 100)]
    d = decide_restart(history, POLICY, u=1.0)
    assert d.restart and d.reason == "Crash" and d.delay_seconds == 10
    assert d.num_restarts == 1 and d.num_counted_restarts == 1 and "restarting in 10.0 s" in d.message
    history += [failure(CRASH, 200), failure(CRASH, 300)]
    d = decide_restart(history, POLICY, u=1.0)
    assert d.restart and d.delay_seconds == 40 and d.num_counted_restarts == 3
    history.append(failure(CRASH, 400))
    d = decide_restart(history, POLICY, u=1.0)
    assert not d.restart and d.reason == REASON_MAX_RESTARTS and d.delay_seconds == 0
    assert d.num_restarts == 3 and "4 failures exceed max_restarts=3" in d.message


def test_uncounted_restarts_do_not_use_up_the_limit():
    preempted = [failure(ExitClass.PREEMPTED, s, counts=False) for s in range(100, 1000, 100)]
    d = decide_restart(preempted, POLICY, u=0.0)
    assert d.restart and d.num_restarts == 9 and d.num_counted_restarts == 0
    assert d.delay_seconds == 5  # the first backoff step
    zero = RestartPolicy(max_restarts=0)
    assert decide_restart([failure(ExitClass.NODE_LOST, 5, counts=False)], zero, u=0).restart
    assert not decide_restart([failure(CRASH, 5)], zero, u=0).restart


def test_non_retryable_class_stops_with_its_own_reason():
    d = decide_restart([failure(ExitClass.CONFIG_ERROR, None, retry=False, counts=False)], POLICY, u=0)
    assert not d.restart and d.reason == "ConfigError" and d.message == "ConfigError happened"
    d = decide_restart([failure(ExitClass.SUCCEEDED, 500, retry=False, counts=False)], POLICY, u=0)
    assert not d.restart and d.reason == "Succeeded"


def test_crash_before_the_first_step_fails_after_one_retry_as_a_user_error():
    end = AttemptEnd(ranks=(RankExit(rank=0, exit_code=1, log_tail="ImportError: no module named foo"),))
    first = classify(end)
    assert first.exit_class is ExitClass.CRASH_BEFORE_FIRST_STEP
    assert decide_restart([first], POLICY, u=0).restart
    d = decide_restart([first, classify(end)], POLICY, u=0)
    assert not d.restart and d.reason == REASON_USER_ERROR
    assert "CrashBeforeFirstStep 2 times before the first step" in d.message and "ImportError" in d.message


def test_crash_loop_at_the_same_step_stops_before_the_restart_limit():
    policy = RestartPolicy(max_restarts=10, crash_loop_limit=3)
    history = [failure(CRASH, 500), failure(ExitClass.OOM, 500), failure(CRASH, 500)]
    assert decide_restart(history, policy, u=0).restart  # OOM at 500 is another class: 2 crashes so far
    history.append(failure(CRASH, 500))
    d = decide_restart(history, policy, u=0)
    assert not d.restart and d.reason == REASON_CRASH_LOOP and "Crash 3 times at step 500" in d.message
    spread = [failure(CRASH, s) for s in (500, 501, 502, 503)]
    assert decide_restart(spread, policy, u=0).restart


def test_uncounted_repeats_are_not_a_crash_loop():
    history = [failure(ExitClass.PREEMPTED, None, counts=False)] * 5
    assert decide_restart(history, POLICY, u=0).restart
    # An OOM before the first step twice is a loop too, but not a user error.
    d = decide_restart([failure(ExitClass.OOM, None)] * 2, POLICY, u=0)
    assert not d.restart and d.reason == REASON_CRASH_LOOP


def test_the_backoff_starts_over_after_an_attempt_that_trained_for_a_while():
    """n counts the counted failures since the last attempt that trained for backoff_reset_seconds: a long job
    failing now and then restarts after the base delay, a job failing fast climbs to the cap as before."""
    import dataclasses

    policy = RestartPolicy(
        max_restarts=100, backoff_base_seconds=10, backoff_max_seconds=60, backoff_jitter=0.5
    )

    def trained(c: Classification, seconds: float) -> Classification:
        return dataclasses.replace(c, trained_seconds=seconds)

    fast = [trained(failure(CRASH, s), 30) for s in (100, 200, 300, 400)]
    assert decide_restart(fast, policy, u=1.0).delay_seconds == 60  # n = 4: the cap
    slow = [trained(failure(CRASH, s), 7200) for s in (100, 200, 300, 400)]
    d = decide_restart(slow, policy, u=1.0)
    assert d.delay_seconds == 10 and d.num_counted_restarts == 4  # n = 1; the limit still counts them all
    # After a long attempt, two quick failures: n = 2.
    mixed = [*slow, trained(failure(CRASH, 410), 5), trained(failure(CRASH, 420), 5)]
    assert decide_restart(mixed, policy, u=1.0).delay_seconds == 20
    assert decide_restart([failure(CRASH, 100)] * 1, policy, u=1.0).delay_seconds == 10  # unknown: not reset


def test_crashes_before_the_first_step_are_counted_in_a_row():
    before = failure(ExitClass.CRASH_BEFORE_FIRST_STEP, None)
    d = decide_restart([before, failure(CRASH, 500), before], POLICY, u=0)
    assert d.restart  # an attempt trained in between: the first start-up crash of a new row
    d = decide_restart([before, failure(CRASH, 500), before, before], POLICY, u=0)
    assert not d.restart and d.reason == REASON_USER_ERROR


def test_decide_restart_needs_history():
    with pytest.raises(ValueError, match="^history:"):
        decide_restart([], POLICY, u=0)


# ------------------------------------------------------------------------------------- checkpoint interval

INTERVAL = CheckpointIntervalPolicy(
    min_interval_steps=10, max_interval_steps=10_000, prior_mtbf_seconds=36_000, prior_failures=1
)


def test_mtbf_starts_at_the_prior_and_follows_the_failures():
    assert estimate_mtbf_seconds(0, 0, INTERVAL) == 36_000
    assert estimate_mtbf_seconds(0, 36_000, INTERVAL) == 72_000  # a failure-free day pushes it up
    assert estimate_mtbf_seconds(9, 36_000, INTERVAL) == pytest.approx(7_200)  # 9 in 10 h: ~1 per 1.1 h
    assert estimate_mtbf_seconds(999, 3_600_000, INTERVAL) == pytest.approx(3_636, rel=1e-3)


def test_young_daly_interval_in_steps():
    # C = 20 s, M = 36,000 s: sqrt(2 x 20 x 36,000) = 1,200 s; at 2 s per step: 600 steps.
    r = auto_checkpoint_interval(
        save_seconds=20, median_step_seconds=2, num_failures=0, observed_seconds=0, policy=INTERVAL
    )
    assert r.interval_seconds == pytest.approx(1200) and r.steps == 600 and not r.clamped
    assert r.mtbf_seconds == 36_000 and r.save_seconds == 20
    # Four times the failure rate halves the interval.
    r4 = auto_checkpoint_interval(
        save_seconds=20, median_step_seconds=2, num_failures=3, observed_seconds=0, policy=INTERVAL
    )
    assert r4.steps == 300


def test_interval_is_bounded():
    tiny = auto_checkpoint_interval(
        save_seconds=0.01, median_step_seconds=10, num_failures=0, observed_seconds=0, policy=INTERVAL
    )
    assert tiny.steps == 10 and tiny.clamped and tiny.optimal_steps == pytest.approx(math.sqrt(720) / 10)
    huge = auto_checkpoint_interval(
        save_seconds=600, median_step_seconds=0.1, num_failures=0, observed_seconds=0, policy=INTERVAL
    )
    assert huge.steps == 10_000 and huge.clamped


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"save_seconds": -1}, "save_seconds"),
        ({"median_step_seconds": 0}, "median_step_seconds"),
        ({"num_failures": -1}, "num_failures"),
        ({"observed_seconds": math.nan}, "observed_seconds"),
    ],
)
def test_interval_inputs_are_checked(kwargs, field):
    args = {"save_seconds": 1, "median_step_seconds": 1, "num_failures": 0, "observed_seconds": 0}
    with pytest.raises(ValueError, match=f"^{field}:"):
        auto_checkpoint_interval(**{**args, **kwargs}, policy=INTERVAL)


MEASURED = CheckpointIntervalInputs(
    setting="auto",
    trainer_interval_steps=4,
    median_step_seconds=2.0,
    save_seconds=20.0,
    num_failures=0,
    observed_seconds=0.0,
    policy=INTERVAL,
)


def test_the_interval_in_effect_is_the_specs_number_or_young_daly_once_measured():
    fixed = choose_checkpoint_interval(replace(MEASURED, setting=250))
    assert (fixed.steps, fixed.auto) == (250, None)
    # `auto`, measured: Young/Daly's 600 steps (test_young_daly_interval_in_steps), with its numbers for the event.
    auto = choose_checkpoint_interval(MEASURED)
    assert auto.steps == 600 and auto.auto is not None and auto.auto.interval_seconds == pytest.approx(1200)


@pytest.mark.parametrize("unmeasured", ["median_step_seconds", "save_seconds"])
def test_auto_before_any_measurement_is_the_trainers_interval_within_the_bounds(unmeasured):
    early = choose_checkpoint_interval(replace(MEASURED, **{unmeasured: None}))
    assert (early.steps, early.auto) == (10, None)  # the trainer's 4, raised to min_interval_steps
    within = choose_checkpoint_interval(replace(MEASURED, trainer_interval_steps=40, **{unmeasured: None}))
    assert within.steps == 40


def test_before_a_save_is_measured_a_failing_job_checkpoints_within_half_its_mtbf():
    # Failures every 23 minutes and a trainer interval of 1,000 steps of 6 s (100 minutes): no save would ever
    # commit. Half the MTBF so far (with the policy's prior worth one failure in 10 h) bounds the interval instead.
    unsaved = replace(MEASURED, save_seconds=None, median_step_seconds=6.0, trainer_interval_steps=1000)
    assert choose_checkpoint_interval(unsaved) == choose_checkpoint_interval(replace(unsaved, num_failures=0))
    assert choose_checkpoint_interval(unsaved).steps == 1000  # no failure yet: the trainer's interval
    failing = replace(unsaved, num_failures=30, observed_seconds=30 * 1380.0)
    cut = choose_checkpoint_interval(failing)
    mtbf = (30 * 1380.0 + INTERVAL.prior_mtbf_seconds) / 31
    assert cut.auto is None and cut.cut_to_mtbf_seconds == pytest.approx(mtbf)
    assert cut.steps == int(mtbf / 2 / 6.0)
    assert choose_checkpoint_interval(replace(failing, num_failures=1, observed_seconds=600.0)).steps == 1000
    assert (
        choose_checkpoint_interval(replace(failing, num_failures=10**6)).steps == INTERVAL.min_interval_steps
    )


# ----------------------------------------------------------------------------------------- exclude a node

COST = RestartCost(detection_seconds=0, teardown_seconds=10, launch_seconds=30, load_seconds=20)


def test_exclude_when_the_time_saved_exceeds_the_restart_cost():
    # Saved: 0.3 x 1,000 steps x 1 s = 300 s. Cost: 60 s fixed + 100 recomputed steps x 1 s = 160 s.
    d = decide_exclude_node(
        node="local-1",
        slowdown_fraction=0.3,
        remaining_steps=1000,
        step_seconds=1.0,
        steps_since_checkpoint=100,
        cost=COST,
    )
    assert d.exclude and d.saved_seconds == pytest.approx(300) and d.cost_seconds == pytest.approx(160)
    assert d.numbers["recompute_seconds"] == 100 and d.numbers["load_seconds"] == 20
    assert d.message.startswith("excluding node local-1: 30% slower over 1000 remaining steps")


def test_keep_the_node_near_the_end_of_the_job_or_without_a_spare():
    near_end = decide_exclude_node(
        node="n",
        slowdown_fraction=0.3,
        remaining_steps=400,
        step_seconds=1.0,
        steps_since_checkpoint=100,
        cost=COST,
    )
    assert not near_end.exclude and near_end.saved_seconds == pytest.approx(120)
    assert near_end.message.startswith("keeping node n")
    # Without a spare, 8 -> 7 data-parallel ranks: each step takes 8/7 as long, which eats most of a 10% gain.
    shrink = decide_exclude_node(
        node="n",
        slowdown_fraction=0.1,
        remaining_steps=10_000,
        step_seconds=1.0,
        steps_since_checkpoint=0,
        cost=COST,
        throughput_after=7 / 8,
    )
    assert shrink.saved_seconds == pytest.approx(11_000 - 80_000 / 7) and not shrink.exclude


def slow_rank(node: str = "node-1", slowdown: float = 2.5) -> StragglerReport:
    return StragglerReport(
        rank=2,
        node=node,
        step=9,
        own_work_seconds=0.8 * slowdown,
        reference_seconds=0.8,
        score=12.0,
        ratio=None,
        phase="backward",
        cause="compute",
        windows=2,
        node_wide=False,
    )


# 2.5x slower, 989 steps left at 2 s a step now (0.8 s healthy): staying costs 989 x 0.8 x 1.5 = 1,187 s more.
CASE = ExclusionCase(
    report=slow_rank(),
    step=11,
    total_steps=1000,
    step_seconds=2.0,
    cost=COST,
    dp=4,
    spare_nodes_left=1,
    placeable=True,
)


def test_exclusion_with_a_spare_weighs_the_time_saved_at_full_throughput():
    d = decide_exclusion(CASE)
    assert d.exclude and d.node == "node-1"
    assert d.saved_seconds == pytest.approx(989 * 0.8 * 1.5) and d.cost_seconds == pytest.approx(60)
    expected = {"throughput_after": 1.0, "steps_since_checkpoint": 0.0, "dp": 4.0, "spare_nodes_left": 1.0}
    assert {k: d.numbers[k] for k in expected} == expected
    assert d.numbers["step_seconds"] == pytest.approx(0.8) and d.numbers[
        "slowdown_fraction"
    ] == pytest.approx(1.5)
    assert d.message.startswith("excluding node node-1: 150% slower over 989 remaining steps")
    # Near the end the restart costs more than it saves: kept, by the same weighing.
    late = decide_exclusion(replace(CASE, step=990))
    assert not late.exclude and late.message.startswith("keeping node node-1: 150% slower over 10 remaining")


def test_exclusion_without_a_spare_weighs_a_smaller_data_parallel_group():
    d = decide_exclusion(replace(CASE, spare_nodes_left=0))
    assert d.numbers["throughput_after"] == 0.75
    # 989 steps at 0.8 / 0.75 s instead of 2 s: 989 x (2 - 1.0667) s saved.
    assert d.exclude and d.saved_seconds == pytest.approx(989 * (2.0 - 0.8 / 0.75))


def test_a_node_the_next_attempt_cannot_do_without_is_kept_whatever_the_weighing():
    d = decide_exclusion(replace(CASE, spare_nodes_left=0, placeable=False))
    assert not d.exclude and d.saved_seconds > d.cost_seconds  # it would have paid
    assert (
        d.message
        == "keeping node node-1: without it the next attempt would have too few nodes (no spare left)"
    )


def test_dp1_without_a_spare_keeps_the_node_without_weighing():
    """Excluding would leave no data-parallel replica (throughput 0): a complete answer, not a ValueError."""
    d = decide_exclusion(replace(CASE, dp=1, spare_nodes_left=0, placeable=False))
    assert not d.exclude and d.node == "node-1"
    assert d.message == "keeping node node-1: no spare node and data parallelism cannot shrink (dp=1)"
    assert d.numbers["throughput_after"] == 0.0 and d.numbers["dp"] == 1.0
    assert d.cost_seconds == COST.fixed_seconds
    # With a spare, dp=1 is weighed like any other job: the spare takes the node's place.
    assert decide_exclusion(replace(CASE, dp=1)).exclude


def test_a_report_faster_than_the_reference_is_no_gain():
    d = decide_exclusion(replace(CASE, report=slow_rank(slowdown=0.9)))
    assert not d.exclude and d.numbers["slowdown_fraction"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"step_seconds": 0.0}, "step_seconds"),
        ({"dp": 0}, "dp"),
        ({"spare_nodes_left": -1}, "spare_nodes_left"),
    ],
)
def test_exclusion_case_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        replace(CASE, **kwargs)


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="^teardown_seconds:"):
        RestartCost(teardown_seconds=-1, launch_seconds=0, load_seconds=0)
    with pytest.raises(ValueError, match="^throughput_after:"):
        decide_exclude_node(
            node="n",
            slowdown_fraction=0.1,
            remaining_steps=1,
            step_seconds=1,
            steps_since_checkpoint=0,
            cost=COST,
            throughput_after=0,
        )


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (RestartPolicy, {"max_restarts": -1}, "max_restarts"),
        (RestartPolicy, {"crash_loop_limit": 0}, "crash_loop_limit"),
        (RestartPolicy, {"backoff_base_seconds": 10, "backoff_max_seconds": 5}, "backoff_max_seconds"),
        (RestartPolicy, {"backoff_jitter": 2}, "backoff_jitter"),
        (CheckpointIntervalPolicy, {"min_interval_steps": 0}, "min_interval_steps"),
        (CheckpointIntervalPolicy, {"min_interval_steps": 10, "max_interval_steps": 5}, "max_interval_steps"),
        (CheckpointIntervalPolicy, {"prior_mtbf_seconds": 0}, "prior_mtbf_seconds"),
    ],
)
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        cls(**kwargs)
