"""StorageUnavailable (issue 11): the trainer's EXIT_STORAGE_UNAVAILABLE is its own class, named after the path,
never a Crash and never a CrashLoop: the job fails at once, because the trainer already trained through the
outage and retried its saves for `checkpoint.storage_outage_seconds`. Unit tests of the classification and the
restart decision, and one real job whose checkpoint folder is immutable (chattr +i) from the start."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from controller.failures import AttemptEnd, ExitClass, FailureAction, FailureRule, RankExit, classify
from controller.policy import REASON_CRASH_LOOP, RestartPolicy, decide_restart

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The trainer's contract (trainer.contract.telemetry), spelled out: the test pins it.
EXIT_STORAGE_UNAVAILABLE = 74
STORAGE_UNAVAILABLE = "checkpoint storage unavailable"
ROOT = "/mnt/ckpt/run-7/checkpoints"
LINE = (
    f"2026-01-01 00:00:00,000 ERROR [rank 1] {STORAGE_UNAVAILABLE}: {ROOT}: no checkpoint could be written for "
    "600 s (checkpoint.storage_outage_seconds = 600), 12 failed saves, the last of step 18: rank 0: could not "
    f"create the step folder: PermissionError: [Errno 1] Operation not permitted: '{ROOT}/step-00000018.tmp-1'"
)


def gave_up(rank: int, **kw) -> RankExit:
    tail = f"step 24 | loss 2.1\n{LINE.replace('[rank 1]', f'[rank {rank}]')}\n"
    return RankExit(rank=rank, node=f"local-{rank}", exit_code=EXIT_STORAGE_UNAVAILABLE, log_tail=tail, **kw)


def test_the_exit_code_is_storage_unavailable_naming_the_path_and_not_retried():
    from trainer.contract import telemetry

    assert (telemetry.EXIT_STORAGE_UNAVAILABLE, telemetry.STORAGE_UNAVAILABLE) == (74, STORAGE_UNAVAILABLE)
    # torchrun stopped the rank that had not exited yet with SIGTERM: still the storage, not a preemption.
    end = AttemptEnd(ranks=(gave_up(1, exited_at=10.0), RankExit.from_returncode(0, -15)), last_step=24)
    c = classify(end)
    assert c.exit_class is ExitClass.STORAGE_UNAVAILABLE and c.reason == "StorageUnavailable"
    assert not c.retryable and not c.counts_toward_limit and c.ranks == (1,) and c.step == 24
    assert c.message.startswith(f"rank 1 (local-1): {STORAGE_UNAVAILABLE}: {ROOT}: no checkpoint could be")
    assert "PermissionError" in c.message


def test_it_wins_over_crash_and_out_of_memory_and_needs_the_code_itself():
    crashed = RankExit(rank=0, exit_code=1, log_tail="OutOfMemoryError: CUDA out of memory\n", exited_at=11.0)
    c = classify(AttemptEnd(ranks=(gave_up(1, exited_at=10.0), crashed), last_step=3))
    assert c.exit_class is ExitClass.STORAGE_UNAVAILABLE
    # The line alone (a rank that crashed after logging it) is a crash; the code is the trainer's verdict.
    c = classify(AttemptEnd(ranks=(RankExit(rank=0, exit_code=1, log_tail=LINE),), last_step=3))
    assert c.exit_class is ExitClass.CRASH
    killed = RankExit(rank=0, exit_code=EXIT_STORAGE_UNAVAILABLE, signal=signal.SIGKILL)
    assert classify(AttemptEnd(ranks=(killed,), last_step=3)).exit_class is not ExitClass.STORAGE_UNAVAILABLE
    # Without the line (a log lost) the class stands, with the marker alone.
    c = classify(AttemptEnd(ranks=(RankExit(rank=0, exit_code=EXIT_STORAGE_UNAVAILABLE),), last_step=3))
    assert c.exit_class is ExitClass.STORAGE_UNAVAILABLE and c.message == f"rank 0: {STORAGE_UNAVAILABLE}"


def test_the_job_fails_at_once_with_its_own_reason_never_a_crash_loop():
    policy = RestartPolicy(max_restarts=5, crash_loop_limit=3)
    first = classify(AttemptEnd(ranks=(gave_up(0),), last_step=18))
    d = decide_restart([first], policy, u=0.0)
    assert not d.restart and d.reason == "StorageUnavailable" and d.reason != REASON_CRASH_LOOP
    assert ROOT in d.message
    # A user rule may still ask for retries (storage that comes back on its own); they never become CrashLoop.
    rule = FailureRule(
        name="storage-retry", action=FailureAction.IGNORE_FOR_LIMIT, reasons=("StorageUnavailable",)
    )
    again = classify(AttemptEnd(ranks=(gave_up(0),), last_step=18), [rule])
    assert again.exit_class is ExitClass.STORAGE_UNAVAILABLE and again.retryable
    history = [again] * 4
    assert decide_restart(history, policy, u=0.0).restart


# ------------------------------------------------------------------------------------------- a real job


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_a_job_whose_checkpoint_folder_stays_unwritable_fails_storage_unavailable(tmp_path: Path) -> None:
    import train_harness
    from job_harness import JobRun, job_spec, training_section
    from unwritable import mechanism, unwritable

    how, why = mechanism(tmp_path)
    if how is None:
        pytest.fail(f"cannot make a folder unwritable here: {why}")
    training = training_section(
        train_harness.make_data(tmp_path / "data"), tmp_path / "cache", steps=60, interval=2
    )
    training["checkpoint"]["storage_outage_seconds"] = 3
    run = JobRun(tmp_path / "job", job_spec("outage", training))
    root = run.run_dir() / "checkpoints"
    root.mkdir(parents=True)
    try:
        with unwritable(root, how):
            run.start_controller()
            assert run.wait_done(timeout=300) == "failed"
    finally:
        run.stop()
    job = run.job()
    attempts = run.attempts()
    print(f"\n[storage outage job] {job.phase_reason}: {job.phase_message}")
    assert job.phase_reason == "StorageUnavailable", [e.message for e in run.events()]
    assert f"{STORAGE_UNAVAILABLE}: {root}" in job.phase_message
    assert "checkpoint.storage_outage_seconds = 3" in job.phase_message
    assert len(attempts) == 1  # failed at once: no restart, no recomputed step
    assert (job.current_step or 0) < 60
