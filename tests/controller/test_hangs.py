"""Hang detection: the progress rule with its step-time term, start-up judged apart, and which ranks stopped
first."""

from __future__ import annotations

import pytest

from controller.hangs import HangConfig, RankProgress, detect_hang
from trainer.contract.telemetry import RankSample

CONFIG = HangConfig(hang_timeout_seconds=60, step_time_factor=10, startup_timeout_seconds=300)
LAUNCH = 1_000.0


def ranks(progress: list[float | None], *, start: float = LAUNCH + 5, step: int = 40) -> list[RankProgress]:
    return [
        RankProgress(
            rank=i,
            node=f"local-{i // 2}",
            step=None if p is None else step,
            last_progress=p,
            process_start=start,
        )
        for i, p in enumerate(progress)
    ]


def check(progress, now, median=1.0, **kw):
    return detect_hang(
        ranks(progress, **kw), now=now, launched_at=LAUNCH, median_step_seconds=median, config=CONFIG
    )


def test_a_hang_begins_when_the_limit_passed_not_when_it_was_seen():
    v = check([2000.0, 1990.0], now=2100.0)
    assert v.hung and v.since == 2000.0 and v.threshold_seconds == 60
    assert v.hung_at == 2060.0  # the attempt's failure time: detection is counted from here
    startup = check([None, None], now=1400.0)
    assert (
        startup.hung and startup.hung_at == LAUNCH + 5 + 300
    )  # the last process start plus the start-up limit


def test_progressing_job_is_not_hung():
    v = check([2000.0, 2000.5, 1999.8, 2000.2], now=2010.0)
    assert not v.hung and v.phase == "training"
    assert v.since == 2000.5 and v.idle_seconds == pytest.approx(9.5)
    assert v.stale == () and v.first_stalled == ()


def test_hung_when_no_rank_progressed_for_the_timeout_and_the_culprit_stopped_first():
    # Rank 2 hung at 1990; the others finished their micro-steps and blocked in the all-reduce about a step later.
    progress = [1991.0, 1991.2, 1990.0, 1991.1]
    assert not check(progress, now=1991.2 + 59).hung
    v = check(progress, now=1991.2 + 61)
    assert v.hung and v.threshold_seconds == 60 and v.idle_seconds == pytest.approx(61)
    assert [s.rank for s in v.stale] == [2, 0, 3, 1]
    assert v.stale[0].since == 1990.0 and v.stale[0].seconds == pytest.approx(62.2)
    assert v.first_stalled == (2,)
    assert "rank 2 on local-1 at step 40" in v.message and "limit 60 s" in v.message


def test_ranks_waiting_out_a_checkpoint_storage_outage_are_alive_until_their_reports_stop():
    """After its last step a rank waits for the checkpoint storage without stepping; its outage reports count as
    progress (the trainer's own limit ends the wait). A rank whose reports stopped is hung like any other."""
    waiting = [
        RankProgress(rank=i, node="local-0", step=16, last_progress=2000.0, storage_wait_at=2000.0 + wait)
        for i, wait in enumerate((95.0, 94.0))
    ]
    verdict = detect_hang(waiting, now=2100.0, launched_at=LAUNCH, median_step_seconds=1.0, config=CONFIG)
    assert not verdict.hung and verdict.since == 2095.0
    verdict = detect_hang(
        waiting, now=2095.0 + 61, launched_at=LAUNCH, median_step_seconds=1.0, config=CONFIG
    )
    assert verdict.hung and verdict.first_stalled == (1,)  # its reports stopped first


def test_a_gang_past_its_last_step_is_finishing_and_gets_the_startup_limit():
    """After the job's last step the ranks save, commit and tear down without stepping (6 s under load, seen
    against an 8 s timeout): measured against the start-up limit, from the last step; while any rank still has
    steps to take, the training limit applies."""
    progress = [2000.0, 2000.3]
    done = detect_hang(
        ranks(progress, step=15),
        now=2000.3 + 61,
        launched_at=LAUNCH,
        median_step_seconds=1.0,
        config=CONFIG,
        last_step=15,
    )
    assert not done.hung and done.phase == "finishing" and done.threshold_seconds == 300
    stuck = detect_hang(
        ranks(progress, step=15),
        now=2000.3 + 301,
        launched_at=LAUNCH,
        median_step_seconds=1.0,
        config=CONFIG,
        last_step=15,
    )
    assert stuck.hung and stuck.message.startswith("the gang has not exited 301 s after the last step")
    one_behind = ranks(progress, step=15)
    one_behind[0] = RankProgress(
        rank=0, node="local-0", step=14, last_progress=2000.0, process_start=LAUNCH + 5
    )
    training = detect_hang(
        one_behind, now=2000.3 + 61, launched_at=LAUNCH, median_step_seconds=1.0, config=CONFIG, last_step=15
    )
    assert training.hung and training.phase == "training"


def test_long_steps_stretch_the_limit_to_k_median_steps():
    progress = [2000.0, 2000.0]
    assert not check(progress, now=2000 + 100, median=12.0).hung  # limit 10 x 12 = 120 s
    v = check(progress, now=2000 + 121, median=12.0)
    assert v.hung and v.threshold_seconds == 120
    assert v.first_stalled == (0, 1)  # stopped together: both named


def test_startup_uses_its_own_timeout_from_the_last_process_start():
    late = LAUNCH + 100  # one node came up late: the gang could not start before it
    rs = ranks([None, None, None, None])
    rs[3] = RankProgress(rank=3, node="local-1", process_start=late)
    v = detect_hang(rs, now=late + 299, launched_at=LAUNCH, median_step_seconds=None, config=CONFIG)
    assert not v.hung and v.phase == "startup" and v.since == late and v.threshold_seconds == 300
    assert [s.rank for s in v.stale] == [0, 1, 2]  # each started more than 300 s ago
    v = detect_hang(rs, now=late + 301, launched_at=LAUNCH, median_step_seconds=None, config=CONFIG)
    assert v.hung and "start-up" in v.message and "no step yet" in v.message


def test_startup_of_ranks_that_never_reported_counts_from_launch():
    silent = [RankProgress(rank=0), RankProgress(rank=1)]
    v = detect_hang(silent, now=LAUNCH + 301, launched_at=LAUNCH, median_step_seconds=None, config=CONFIG)
    assert v.hung and v.since == LAUNCH and {s.since for s in v.stale} == {LAUNCH}
    none = detect_hang([], now=LAUNCH + 301, launched_at=LAUNCH, median_step_seconds=None, config=CONFIG)
    assert none.hung and none.stale == ()


def test_rank_that_never_progressed_while_others_did_is_the_culprit():
    v = check([1900.0, None, 1900.5, 1900.2], now=1900.5 + 61)
    assert v.hung and v.phase == "training"
    assert v.stale[0].rank == 1 and not v.stale[0].progressed and v.stale[0].since == LAUNCH + 5
    assert v.first_stalled == (1,)


def test_training_without_a_median_yet_uses_the_hang_timeout_and_clock_skew_is_clamped():
    v = check([2000.0], now=1999.0, median=None)
    assert not v.hung and v.idle_seconds == 0.0 and v.threshold_seconds == 60


def test_from_sample_reads_the_telemetry_contract():
    sample = RankSample(
        training_job="j",
        node="n1",
        rank=3,
        local_rank=1,
        step=7,
        last_progress_timestamp_seconds=10.0,
        process_start_time_seconds=2.0,
    )
    assert RankProgress.from_sample(sample) == RankProgress(
        rank=3, node="n1", step=7, last_progress=10.0, process_start=2.0
    )


@pytest.mark.parametrize("name", ["hang_timeout_seconds", "step_time_factor", "startup_timeout_seconds"])
def test_config_errors_name_the_field(name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        HangConfig(**{name: 0})
    with pytest.raises(ValueError, match="^median_step_seconds:"):
        check([1.0], now=2.0, median=-1.0)


WAITING = """Process 27720: python -m trainer.train attempt-1.json
Python v3.11.7

Thread 27720 (idle): "MainThread"
    all_reduce (torch/distributed/distributed_c10d.py:3252)
    ParallelEngine.train_step (trainer/parallel/engine.py:242)
    Run.train_step (trainer/runtime.py:452)
Thread 27774 (idle): "Thread-1 (serve_forever)"
    BaseServer.serve_forever (socketserver.py:233)
"""
STUCK = """Process 27801: python -m trainer.train attempt-1.json

Thread 27801 (idle): "MainThread"
    Event.wait (threading.py:629)
    FaultInjector.before_step (trainer/faults.py:140)
    Run.train_step (trainer/runtime.py:430)
Thread 27850 (idle): "snapshot-replicator"
    isend (torch/distributed/distributed_c10d.py:2500)
"""


def test_the_stacks_tell_the_stuck_rank_from_the_ones_waiting_for_it():
    """A step that opens with a collective stops every rank at once: the timestamps blame both, the stacks one
    (a replicator thread inside torch.distributed does not make its stuck main thread a waiting one)."""
    from controller.hangs import hang_culprits, waiting_on_peers

    assert waiting_on_peers(WAITING) and not waiting_on_peers(STUCK)
    assert hang_culprits((0, 1), stacks={0: WAITING, 1: STUCK}) == (1,)
    assert hang_culprits((0, 1), stacks={0: WAITING, 1: WAITING}) == (0, 1)  # nothing learned: as before
    assert hang_culprits((0, 1), stacks={}) == (0, 1)
    assert hang_culprits((0, 1), stacks={0: WAITING, 1: STUCK}, stopped={0}) == (0,)  # SIGSTOPped: to blame
