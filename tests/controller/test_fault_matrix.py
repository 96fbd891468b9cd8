"""The fault matrix: real jobs (the mini Qwen2-VL, 2 local nodes, data-parallel), real faults, a real controller
process. Every run goes to completion and its loss at every step is bitwise equal to an uninterrupted run's.

Each test prints the detection latency (from the fault to the controller's Failure event) and the time to the
first resumed step (from the fault to the first step line the next attempt writes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_harness  # noqa: E402
from job_harness import JobRun, job_spec, training_section  # noqa: E402

from trainer.contract.checkpoint import list_checkpoints  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STEPS = 12
INTERVAL = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("data")
    return train_harness.make_data(root), root / "cache"


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The same job with no fault, run by the controller once for the whole module."""
    run = JobRun(tmp_path_factory.mktemp("clean"), _spec("clean", data))
    try:
        run.start_controller()
        assert run.wait_done() == "succeeded"
        losses = run.losses()
    finally:
        run.stop()
    assert sorted(losses) == list(range(STEPS))
    return losses


def _spec(name: str, data: tuple[list[str], Path], **sections) -> dict:
    paths, cache = data
    return job_spec(name, training_section(paths, cache, steps=STEPS, interval=INTERVAL), **sections)


def _failure_after(run: JobRun, t: float) -> float:
    """Unix time of the first Failure event after `t`."""
    for event in run.events():
        if event.type == "Failure" and event.time.timestamp() > t:
            return event.time.timestamp()
    raise AssertionError("no Failure event")


def _report(name: str, run: JobRun, fault_at: float) -> None:
    detected = _failure_after(run, fault_at)
    resumed = run.first_step_after(detected)
    assert resumed is not None
    print(
        f"\n[{name}] detection latency {detected - fault_at:.2f} s, "
        f"time to the first resumed step {resumed - fault_at:.2f} s"
    )


def _finish_and_compare(run: JobRun, uninterrupted: dict[int, float]) -> None:
    assert run.wait_done() == "succeeded", [e.message for e in run.events()]
    assert run.losses() == uninterrupted  # bitwise: float equality of every step's loss


def test_sigkill_one_rank_mid_step(data, uninterrupted, tmp_path: Path) -> None:
    run = JobRun(tmp_path, _spec("kill-mid-step", data))
    try:
        run.start_controller()
        run.wait_step(6)
        os.kill(run.rank_pid(1), signal.SIGKILL)
        fault_at = time.time()
        _finish_and_compare(run, uninterrupted)
        attempts = run.attempts()
        assert len(attempts) == 2
        assert attempts[0].exit_class == "Crash"
        assert attempts[1].resumed_from_step == 4  # the newest committed checkpoint before the kill
        _report("SIGKILL mid-step", run, fault_at)
    finally:
        run.stop()


def test_sigkill_during_a_checkpoint_save(data, uninterrupted, tmp_path: Path) -> None:
    run = JobRun(tmp_path, _spec("kill-in-save", data))
    try:
        run.start_controller()
        root = run.run_dir() / "checkpoints"
        run.wait_step(5)
        pid = run.rank_pid(1)
        # The save of step 8 in flight: its temporary folder exists, no committed step 8 yet.
        run.wait(
            lambda: (
                any(p.name.startswith("step-00000008.tmp") for p in root.iterdir())
                if root.exists()
                else False
            ),
            timeout=240,
            what="the save of step 8 to start",
            every=0.002,
        )
        os.kill(pid, signal.SIGKILL)
        fault_at = time.time()
        _finish_and_compare(run, uninterrupted)
        attempts = run.attempts()
        assert len(attempts) == 2
        # Step 8 was not committed by every rank: the resume must come from an earlier, complete one.
        assert attempts[1].resumed_from_step in (4, 8)
        if attempts[1].resumed_from_step == 8:
            pytest.fail("resumed from the checkpoint whose save was killed")
        _report("SIGKILL during a save", run, fault_at)
    finally:
        run.stop()


def test_sigstop_one_rank_is_a_hang_detected_within_the_timeout(data, uninterrupted, tmp_path: Path) -> None:
    timeout = 8.0
    spec = _spec("hang", data, fault_tolerance={"hang_timeout_seconds": timeout, "hang_step_factor": 1})
    run = JobRun(tmp_path, spec)
    try:
        run.start_controller()
        run.wait_step(6)
        pid = run.rank_pid(1)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        # Progress stops within a step of the SIGSTOP; the hang is declared `timeout` later, plus a poll.
        run.wait(lambda: any(e.reason == "Hang" for e in run.events()), timeout=120, what="the hang verdict")
        detected = _failure_after(run, stopped_at)
        assert detected - stopped_at <= timeout + 10, detected - stopped_at
        assert any(e.reason == "StacksDumped" for e in run.events())
        _finish_and_compare(run, uninterrupted)
        assert [a.exit_class for a in run.attempts()] == ["Hang", "Succeeded"]
        _report("SIGSTOP (hang)", run, stopped_at)
    finally:
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(pid, signal.SIGCONT)
        run.stop()


def test_controller_killed_and_restarted_mid_run(data, uninterrupted, tmp_path: Path) -> None:
    run = JobRun(tmp_path, _spec("ctl-restart", data))
    try:
        run.start_controller()
        run.wait_step(4)
        pids = {r: run.rank_pid(r) for r in (0, 1)}
        run.kill_controller()
        events_before = len(run.events())
        killed_at = time.time()
        time.sleep(2)  # the ranks go on training alone
        run.start_controller()
        _finish_and_compare(run, uninterrupted)
        attempts = run.attempts()
        assert len(attempts) == 1, "the healthy gang was relaunched"
        events = run.events()
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gaps, nothing lost
        assert len(events) >= events_before
        print(
            f"\n[controller restart] ranks kept their pids {pids}; no relaunch; {time.time() - killed_at:.1f} s to the end"
        )
    finally:
        run.stop()


def test_corrupt_newest_checkpoint_before_a_restart_falls_back(data, uninterrupted, tmp_path: Path) -> None:
    run = JobRun(tmp_path, _spec("corrupt", data))
    try:
        run.start_controller()
        root = run.run_dir() / "checkpoints"
        run.wait(
            lambda: [c.step for c in list_checkpoints(str(root))][-1:] == [8],
            timeout=240,
            what="step 8 saved",
        )
        # Corrupt step 8 (flip bytes in its largest shard; same size, so only the checksum can tell), then
        # kill a rank: the restart must verify, find step 8 corrupt, and resume from step 4.
        step8 = root / "step-00000008"
        shard = max(
            (p for p in step8.iterdir() if p.is_file() and p.suffix in (".distcp", ".pt")),
            key=lambda p: p.stat().st_size,
        )
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            chunk = f.read(64)
            f.seek(shard.stat().st_size // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
        os.kill(run.rank_pid(1), signal.SIGKILL)
        fault_at = time.time()
        _finish_and_compare(run, uninterrupted)
        attempts = run.attempts()
        assert attempts[-1].resumed_from_step == 4, [a.resumed_from_step for a in attempts]
        corrupt = [e for e in run.events() if e.reason == "CheckpointCorrupt"]
        assert corrupt and corrupt[0].data["step"] == 8
        _report("corrupt newest checkpoint", run, fault_at)
    finally:
        run.stop()
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
