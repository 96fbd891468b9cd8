"""Fault injection and the graceful stop, each in a real training-like process.

Run as a script, this file is that process: a small loop with the rank's telemetry (HTTP endpoint and JSONL in
the run folder), the faults from the environment and GracefulStop, saving a "checkpoint" when asked to stop.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trainer.contract.telemetry import EXIT_FAULT_CRASH, EXIT_PREEMPTED, RankLabels, parse_rank_metrics
from trainer.faults import FaultConfig, FaultInjector, GracefulStop, InjectedCrash
from trainer.telemetry import RankTelemetry, StepTimer, TelemetryConfig, read_jsonl


def training_loop(run_dir: Path, steps: int, work: float) -> None:
    labels = RankLabels.from_env(os.environ, hostname="test-node")
    telemetry = RankTelemetry(TelemetryConfig(log_every=0), labels, run_dir=run_dir)
    faults = FaultInjector(FaultConfig.from_env(os.environ), rank=labels.rank)
    try:
        with GracefulStop() as stop:
            for step in range(1, steps + 1):
                faults.before_step(step)
                telemetry.start_step(step)
                with telemetry.timer.phase("forward"):
                    time.sleep(work / 2)
                with telemetry.timer.phase("backward"):
                    time.sleep(work / 2)
                telemetry.micro_step_done()
                faults.slow_down(step, telemetry.timer)
                telemetry.end_step(loss=1.0 / step, text_tokens=10)
                if stop.requested:
                    (run_dir / "checkpoint.json").write_text(json.dumps({"step": step}))
                    stop.exit()
    finally:
        telemetry.close()


def start(
    run_dir: Path, *, steps: int, work: float = 0.02, as_rank: int = 0, **faults: str
) -> subprocess.Popen:
    """The loop as global rank `as_rank`; `faults` are VLCTL_FAULT_* variables by lower-case suffix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLCTL_FAULT_")}
    env.update({"RANK": str(as_rank), "LOCAL_RANK": "0", "VLCTL_TRAINING_JOB": "chaos"})
    env.update({f"VLCTL_FAULT_{k.upper()}": v for k, v in faults.items()})
    args = [sys.executable, __file__, str(run_dir), str(steps), str(work)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def steps_done(run_dir: Path, rank: int = 0) -> list[int]:
    path = run_dir / f"metrics-rank{rank}.jsonl"
    return [line["step"] for line in read_jsonl(path)] if path.exists() else []


def wait_for(predicate, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    ("mode", "code"), [("exit", EXIT_FAULT_CRASH), ("raise", 1), ("kill", -signal.SIGKILL)]
)
def test_crash_at_step_exits_with_the_mode_code_after_the_steps_before(tmp_path, mode, code):
    returncode, err = finish(start(tmp_path, steps=5, crash_at_step="3", crash_mode=mode))
    assert returncode == code
    assert steps_done(tmp_path) == [1, 2]
    assert "rank 0 crash" in err and ((InjectedCrash.__name__ in err) == (mode == "raise"))


def test_faults_spare_other_ranks(tmp_path):
    returncode, _ = finish(start(tmp_path, steps=3, as_rank=0, crash_at_step="2", rank="1"))
    assert returncode == 0 and steps_done(tmp_path) == [1, 2, 3]


def test_once_dir_makes_a_crash_happen_once_per_job(tmp_path):
    once = str(tmp_path / "faults")
    first, _ = finish(start(tmp_path / "a", steps=3, crash_at_step="2", once_dir=once))
    again, _ = finish(start(tmp_path / "b", steps=3, crash_at_step="2", once_dir=once))  # the "resumed" run
    assert (first, again) == (EXIT_FAULT_CRASH, 0)
    assert steps_done(tmp_path / "b") == [1, 2, 3]


def test_hang_keeps_the_process_alive_and_its_progress_stale(tmp_path):
    proc = start(tmp_path, steps=50, hang_at_step="3")
    try:
        endpoint = tmp_path / "metrics-rank0.endpoint.json"
        wait_for(endpoint.exists, "the endpoint file")
        url = json.loads(endpoint.read_text())["url"]

        def stale():  # the detector: scrapable, alive, no progress for 0.5 s
            with urllib.request.urlopen(url, timeout=5) as response:
                (rank,) = parse_rank_metrics(response.read().decode())
            since = rank.seconds_since_progress(time.time())
            return rank if since is not None and since > 0.5 else None

        hung = wait_for(stale, "a stale progress timestamp")
        assert proc.poll() is None and hung.step == 2 and hung.pid == proc.pid
        proc.send_signal(signal.SIGTERM)  # recorded by GracefulStop, never acted on: a hang needs SIGKILL
        time.sleep(0.3)
        assert proc.poll() is None
        assert stale().last_progress_timestamp_seconds == hung.last_progress_timestamp_seconds
    finally:
        proc.kill()
        returncode, err = finish(proc)
    assert returncode == -signal.SIGKILL and "rank 0 hang at step 3" in err


def test_slow_factor_multiplies_own_work_from_its_step(tmp_path):
    returncode, _ = finish(start(tmp_path, steps=8, work=0.04, slow_factor="2", slow_from_step="5"))
    assert returncode == 0
    lines = read_jsonl(tmp_path / "metrics-rank0.jsonl")
    own = {line["step"]: line["own_work_seconds"] for line in lines}
    before = statistics.median(own[s] for s in (2, 3, 4))  # step 1 warms up
    after = statistics.median(own[s] for s in (5, 6, 7, 8))
    # Twice the work, not four times (a factor applied twice) nor once; medians and a wide upper margin, since
    # a loaded machine oversleeps any one step (CI saw 0.041 s -> 0.100 s next to a busy test).
    assert 1.6 <= after / before <= 3.0
    assert lines[-1]["phase_seconds/backward"] > 2 * lines[-1]["phase_seconds/forward"]  # the sleep's phase


def test_sigterm_finishes_the_step_saves_and_exits_preempted(tmp_path):
    proc = start(tmp_path, steps=100_000)
    try:
        wait_for(lambda: len(steps_done(tmp_path)) >= 2, "two steps")
        proc.send_signal(signal.SIGTERM)
        returncode, err = finish(proc)
    finally:
        proc.kill()
    assert returncode == EXIT_PREEMPTED, err
    done = steps_done(tmp_path)
    assert done == list(range(1, len(done) + 1))
    assert json.loads((tmp_path / "checkpoint.json").read_text()) == {"step": done[-1]}


def test_graceful_stop_records_the_signal_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat changes nothing
        wait_for(lambda: stop.requested, "the handler")
        assert stop.signal == signal.SIGTERM
        with pytest.raises(SystemExit) as exited:
            stop.exit()
        assert exited.value.code == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGTERM) is before


def test_slow_down_is_a_no_op_before_its_step():
    timer = StepTimer()
    injector = FaultInjector(FaultConfig(slow_factor=3.0, slow_from_step=10), rank=0)
    timer.start_step(9)
    assert injector.slow_down(9, timer) == 0.0
    assert not FaultConfig().active and FaultConfig(hang_at_step=0).active


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VLCTL_FAULT_CRASH_AT_STEP": "soon"}, "VLCTL_FAULT_CRASH_AT_STEP: expected an integer"),
        ({"VLCTL_FAULT_SLOW_FACTOR": "fast"}, "VLCTL_FAULT_SLOW_FACTOR: expected a number"),
        ({"VLCTL_FAULT_SLOW_FACTOR": "0.5"}, "faults.slow_factor"),
        ({"VLCTL_FAULT_CRASH_MODE": "segfault"}, "faults.crash_mode"),
        ({"VLCTL_FAULT_RANK": "-1"}, "faults.rank"),
        ({"VLCTL_FAULT_CRASH_IN": "step,backward"}, "faults.crash_in: expected step, snapshot, restore"),
    ],
)
def test_bad_fault_settings_name_the_variable_or_field(env, message):
    with pytest.raises(ValueError, match=message):
        FaultConfig.from_env(env)


def test_fault_config_from_the_environment():
    env = {
        "VLCTL_FAULT_CRASH_AT_STEP": "12",
        "VLCTL_FAULT_CRASH_MODE": "kill",
        "VLCTL_FAULT_SLOW_FACTOR": "1.5",
        "VLCTL_FAULT_SLOW_FROM_STEP": "4",
        "VLCTL_FAULT_RANK": "3",
    }
    config = FaultConfig.from_env(env)
    assert (config.crash_at_step, config.crash_mode, config.hang_at_step) == (12, "kill", None)
    assert (config.slow_factor, config.slow_from_step, config.rank, config.once_dir) == (1.5, 4, 3, None)


def test_crash_places_fire_where_they_are_named_and_once_each(tmp_path):
    """`restore` fires in the first restore whatever its step; `step` no longer fires once only `snapshot` and
    `restore` are named; each place has its own once-marker, so a snapshot crash and a restore crash of the same
    rank both happen in one job."""
    config = FaultConfig.from_env(
        {
            "VLCTL_FAULT_CRASH_AT_STEP": "5",
            "VLCTL_FAULT_CRASH_MODE": "raise",
            "VLCTL_FAULT_CRASH_IN": "snapshot, restore",
            "VLCTL_FAULT_ONCE_DIR": str(tmp_path),
        }
    )
    assert config.crash_in == ("snapshot", "restore") and config.active
    faults = FaultInjector(config, rank=1)
    faults.before_step(5)  # not at the step's start
    faults.in_snapshot(4)  # nor in another step's snapshot
    with pytest.raises(InjectedCrash, match="halfway through restoring step 3"):
        faults.in_restore(3)
    FaultInjector(config, rank=1).in_restore(4)  # fired once per job: the marker disarms the next process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crash-restore-rank1"]
    assert FaultConfig(crash_in=("restore",)).active and not FaultConfig(crash_in=("snapshot",)).active


if __name__ == "__main__":
    training_loop(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
