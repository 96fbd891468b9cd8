"""Goodput on hand-built timelines where every number is known."""

from __future__ import annotations

import pytest

from controller.goodput import AttemptTimeline, Goodput, LostCause, StepWindow, compute_goodput


def total(g: Goodput) -> float:
    return g.productive_seconds + sum(g.lost_by_cause().values())


def test_crash_and_resume_from_an_older_checkpoint():
    attempts = [
        # Submitted at 0, launched at 10, first step done at 70; crashed at 170 after step 100, noticed at 175.
        AttemptTimeline(
            launched_at=10,
            first_step_at=70,
            failed_at=170,
            detected_at=175,
            ended_at=180,
            last_step=100,
            checkpoint_stall_seconds=4,
            step_windows=(
                StepWindow(num_steps=100, median_own_work_seconds=0.8, slowest_own_work_seconds=0.85),
            ),
        ),
        # Relaunched at 190 from the checkpoint of step 50: steps 51..100 are done again at 1 s each.
        AttemptTimeline(
            launched_at=190,
            first_step_at=230,
            ended_at=400,
            resumed_from_step=50,
            last_step=220,
            step_seconds=1.0,
            checkpoint_stall_seconds=6,
        ),
    ]
    g = compute_goodput(submitted_at=0, attempts=attempts, now=400)
    assert g.wall_seconds == 400
    assert g.startup_seconds == 70
    assert g.detection_seconds == 5
    assert g.restart_seconds == 55  # 175 -> 230: teardown, backoff, launch, load, first step
    assert g.recomputed_seconds == 50
    assert g.checkpoint_stall_seconds == 10
    assert g.straggler_seconds == pytest.approx(5)
    # Running: 100 s + 170 s, less stalls (10), straggler (5) and recomputed steps (50).
    assert g.productive_seconds == pytest.approx(205)
    assert g.other_seconds == pytest.approx(0)
    assert g.ettr == pytest.approx(205 / 400)
    assert g.lost_by_cause()[LostCause.RESTART] == 55 and total(g) == pytest.approx(400)


def test_crash_before_the_first_step_then_a_hang_then_still_running():
    attempts = [
        AttemptTimeline(launched_at=5, failed_at=30, detected_at=32, ended_at=33),  # import error
        # Hung: the last progress (step 300) at 500, the 60 s timeout noticed it at 560. Checkpoint at step 300.
        AttemptTimeline(
            launched_at=40, first_step_at=100, failed_at=500, detected_at=560, ended_at=570, last_step=300
        ),
        # Resumed from 300: nothing recomputed. Still running at 1000.
        AttemptTimeline(launched_at=580, first_step_at=600, resumed_from_step=300, last_step=600),
    ]
    g = compute_goodput(submitted_at=0, attempts=attempts, now=1000)
    assert g.startup_seconds == 30
    assert g.detection_seconds == 2 + 60
    assert g.restart_seconds == (100 - 32) + (600 - 560)
    assert g.recomputed_seconds == 0
    assert g.productive_seconds == 400 + 400
    assert g.other_seconds == pytest.approx(0) and g.ettr == pytest.approx(0.8)


def test_recomputed_steps_without_a_step_time_use_the_attempt_mean_and_stop_at_its_last_step():
    attempts = [
        AttemptTimeline(launched_at=0, first_step_at=10, failed_at=110, detected_at=110, last_step=200),
        # From step 100; it died again at step 150, before catching up with 200: 50 steps repeated out of 50.
        AttemptTimeline(
            launched_at=120,
            first_step_at=130,
            failed_at=230,
            detected_at=240,
            resumed_from_step=100,
            last_step=150,
        ),
    ]
    g = compute_goodput(submitted_at=0, attempts=attempts, now=240)
    assert g.recomputed_seconds == pytest.approx(100)  # all of its 100 s of running repeated old steps
    assert g.productive_seconds == pytest.approx(100)


def test_final_failure_teardown_is_other_and_the_identity_holds():
    attempts = [
        AttemptTimeline(launched_at=0, first_step_at=20, failed_at=100, detected_at=110, ended_at=150)
    ]
    g = compute_goodput(submitted_at=0, attempts=attempts, now=150, finished=True)
    assert g.other_seconds == 40 and g.productive_seconds == 80 and total(g) == pytest.approx(150)
    waiting = compute_goodput(submitted_at=0, attempts=attempts, now=150)  # in backoff before a relaunch
    assert waiting.restart_seconds == 40 and waiting.other_seconds == 0


def test_pending_job_and_report_time_cut_a_running_attempt():
    assert compute_goodput(submitted_at=0, attempts=[], now=30).startup_seconds == 30
    g = compute_goodput(submitted_at=0, attempts=[AttemptTimeline(launched_at=10, first_step_at=50)], now=40)
    assert g.startup_seconds == 40 and g.productive_seconds == 0 and g.ettr == 0
    zero = compute_goodput(submitted_at=5, attempts=[], now=5)
    assert zero.ettr == 0 and zero.wall_seconds == 0


def test_straggler_windows_count_only_excess_over_the_median():
    w = StepWindow(num_steps=20, median_own_work_seconds=1.0, slowest_own_work_seconds=1.3)
    assert w.excess_seconds == pytest.approx(6)
    assert (
        StepWindow(num_steps=20, median_own_work_seconds=1.0, slowest_own_work_seconds=0.9).excess_seconds
        == 0
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"launched_at": 10, "first_step_at": 5}, "first_step_at"),
        ({"launched_at": 0, "failed_at": 5}, "detected_at"),
        ({"launched_at": 0, "failed_at": 5, "detected_at": 4}, "detected_at"),
        ({"launched_at": 0, "resumed_from_step": 10, "last_step": 5}, "last_step"),
        ({"launched_at": 0, "checkpoint_stall_seconds": -1}, "checkpoint_stall_seconds"),
    ],
)
def test_inconsistent_records_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AttemptTimeline(**kwargs)


def test_attempts_out_of_order_and_now_before_submission_are_rejected():
    a = AttemptTimeline(launched_at=0, first_step_at=10, ended_at=50)
    with pytest.raises(ValueError, match=r"^attempts\[1\].launched_at:"):
        compute_goodput(submitted_at=0, attempts=[a, AttemptTimeline(launched_at=20)], now=100)
    with pytest.raises(ValueError, match="^now:"):
        compute_goodput(submitted_at=10, attempts=[], now=5)


def test_an_in_place_recovery_costs_its_own_time_and_the_steps_it_did_again():
    from controller.goodput import InPlaceRecovery

    # One attempt: first step at 50, a rank lost at 150 and every rank back at the snapshot at 153, one step
    # (2 s) done again; a second recovery at 300 still under way when the report is made at 301.
    attempt = AttemptTimeline(
        launched_at=10,
        first_step_at=50,
        last_step=120,
        step_seconds=2.0,
        recoveries=(
            InPlaceRecovery(failed_at=150, resumed_at=153, steps_lost=1),
            InPlaceRecovery(failed_at=300, resumed_at=310, steps_lost=1),
        ),
    )
    g = compute_goodput(submitted_at=0, attempts=[attempt], now=301)
    assert g.in_place_recovery_seconds == pytest.approx(3 + 1)  # the second one counted up to now
    assert g.recomputed_seconds == pytest.approx(2)  # the unfinished one's step is not known to be lost yet
    assert g.restart_seconds == 0 and g.detection_seconds == 0
    assert g.productive_seconds == pytest.approx(251 - 4 - 2)
    assert total(g) == pytest.approx(301)
    with pytest.raises(ValueError, match="resumed_at"):
        InPlaceRecovery(failed_at=10, resumed_at=5)
