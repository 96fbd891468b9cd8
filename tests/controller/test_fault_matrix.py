"""The fault matrix: real jobs (the mini Qwen2-VL, 2 local nodes, data-parallel), real faults, a real controller
process. Every run goes to completion and its loss at every step is bitwise equal to an uninterrupted run's.
The faults: ranks killed (mid-step during a save, with the newest checkpoint corrupt), a rank stopped (a hang),
the controller killed, the checkpoint storage unwritable for a minute, and, under in-place recovery, a spare,
a rank mid-snapshot, a newcomer mid-restore, a hung newcomer and the controller lost in one run.

Each test prints the detection latency (from the fault to the controller's Failure event) and the time to the
first resumed step (from the fault to the first step line the next attempt writes).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_harness  # noqa: E402
from job_harness import JobRun, job_spec, training_section  # noqa: E402
from unwritable import lock, mechanism, unlock  # noqa: E402

from trainer.contract.checkpoint import list_checkpoints  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
STEPS = 16
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


def _report(name: str, run: JobRun, fault_at: float, *, resumed_attempt: int) -> None:
    """Wait for the resumed attempt's first step; print the detection latency and the time to that step."""
    run.wait(
        lambda: run.first_step_after(fault_at, attempt=resumed_attempt), timeout=240, what=f"{name}: resumed"
    )
    detected = _failure_after(run, fault_at)
    resumed = run.first_step_after(fault_at, attempt=resumed_attempt)
    print(
        f"\n[{name}] detection latency {detected - fault_at:.2f} s, "
        f"time to the first resumed step {resumed - fault_at:.2f} s"
    )


def _finish_and_compare(run: JobRun, uninterrupted: dict[int, float]) -> None:
    assert run.wait_done() == "succeeded", [e.message for e in run.events()]
    assert run.losses() == uninterrupted  # bitwise: float equality of every step's loss


def _rank_pid_in(run: JobRun, rank: int, attempt: int) -> int:
    return run.rank_pid(rank, attempt=attempt)


def _corrupt(step_dir: Path) -> None:
    """Flip 64 bytes in the middle of the largest shard: same size, so only the checksum can tell."""
    shard = max(
        (p for p in step_dir.iterdir() if p.is_file() and p.suffix in (".distcp", ".pt")),
        key=lambda p: p.stat().st_size,
    )
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        chunk = f.read(64)
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_sigkill_during_a_save_then_with_the_newest_checkpoint_corrupt(
    data, uninterrupted, tmp_path: Path
) -> None:
    """Two rank faults in one job, each followed by an automatic resume (one run keeps the suite short). A rank
    killed mid-step without a save in flight is the in-place test's last fault (its disk fallback takes this
    restart path)."""
    run = JobRun(tmp_path, _spec("rank-faults", data, fault_tolerance={"max_restarts": 5}))
    root = run.run_dir() / "checkpoints"
    try:
        run.start_controller()

        # 1. SIGKILL a rank mid-step, while the save of step 8 is in flight (its temporary folder exists).
        pid = _rank_pid_in(run, 1, 1)
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
        _report("SIGKILL during a save", run, time.time(), resumed_attempt=2)
        # Step 8 was not committed by every rank: the resume comes from the complete one before it.
        assert run.attempts()[1].resumed_from_step == 4

        # 2. Corrupt the newest checkpoint (step 12), then SIGKILL a rank: resume falls back to step 8.
        # The rank is found before step 12 and the kill follows the commit at once: the window between the
        # commit of step 12 and the job's end is only four steps, which a loaded machine runs in seconds.
        rank = psutil.Process(_rank_pid_in(run, 1, 2))
        run.wait(
            lambda: [c.step for c in list_checkpoints(str(root))][-1:] == [12],
            timeout=240,
            what="step 12 saved",
            every=0.01,
        )
        _corrupt(root / "step-00000012")
        rank.send_signal(signal.SIGKILL)  # psutil refuses a pid reused by another process
        _report("newest checkpoint corrupt", run, time.time(), resumed_attempt=3)

        _finish_and_compare(run, uninterrupted)
        attempts = run.attempts()
        assert [a.exit_class for a in attempts] == ["Crash", "Crash", "Succeeded"]
        assert attempts[2].resumed_from_step == 8, [a.resumed_from_step for a in attempts]
        corrupt = [e for e in run.events() if e.reason == "CheckpointCorrupt"]
        assert corrupt and corrupt[0].data["step"] == 12
    finally:
        run.stop()


def test_sigstop_hang_then_the_controller_killed_and_restarted(data, uninterrupted, tmp_path: Path) -> None:
    timeout = 8.0
    # The limit is the larger of the timeout and 3 median steps: on a loaded machine a restarted attempt's
    # steps took over 8 s each, and a fixed 8 s limit (factor 1) took them for a second hang.
    spec = _spec(
        "hang-and-ctl", data, fault_tolerance={"hang_timeout_seconds": timeout, "hang_step_factor": 3}
    )
    run = JobRun(tmp_path, spec)
    pid = None
    try:
        run.start_controller()

        # 1. SIGSTOP one rank: no progress anywhere; a hang within the timeout (plus a poll), stacks dumped.
        run.wait_step(5)
        pid = _rank_pid_in(run, 1, 1)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        run.wait(lambda: any(e.reason == "Hang" for e in run.events()), timeout=120, what="the hang verdict")
        detected = _failure_after(run, stopped_at)
        hang = next(e for e in run.events() if e.reason == "Hang")
        limit = float(re.search(r"\(limit (\d+) s\)", hang.message).group(1))
        assert limit >= timeout and detected - stopped_at <= limit + 10, (detected - stopped_at, hang.message)
        assert any(e.reason == "StacksDumped" for e in run.events())
        _report("SIGSTOP (hang)", run, stopped_at, resumed_attempt=2)

        # 2. SIGKILL the controller mid-run and start it again: it re-attaches, the healthy gang goes on.
        run.wait_step(9)
        pids = {r: _rank_pid_in(run, r, 2) for r in (0, 1)}
        run.kill_controller()
        time.sleep(2)  # the ranks train on alone
        run.start_controller()
        _finish_and_compare(run, uninterrupted)
        attempts = run.attempts()
        assert [a.exit_class for a in attempts] == ["Hang", "Succeeded"], "the healthy gang was relaunched"
        events = run.events()
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gaps, nothing lost
        print(f"\n[controller killed and restarted] ranks {pids} kept running; no relaunch")
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        run.stop()


OUTAGE_SECONDS = 60.0


def test_checkpoint_storage_unwritable_for_a_minute_costs_no_step(
    data, uninterrupted, tmp_path: Path
) -> None:
    """Issue 11: a checkpoint folder that cannot be written crashed the ranks, the job recomputed from the
    previous checkpoint and ended `failed (CrashLoop)`. Now the folder is made unwritable from outside (chattr +i:
    root ignores permission bits) right after step 4 commits, for 60 s: the ranks keep training, retry the save
    with backoff, and after the last step wait for the storage, reporting the outage, which the hang check (here
    15 s, shorter than the wait) takes for a sign of life. The job succeeds in its one attempt, every step is
    taken once, every loss is bitwise equal to the uninterrupted run's, and nothing partial is committed."""
    how, why = mechanism(tmp_path)
    assert how is not None, f"cannot make a folder unwritable here: {why}"
    spec = _spec("storage-outage", data, fault_tolerance={"hang_timeout_seconds": 15, "hang_step_factor": 1})
    run = JobRun(tmp_path, spec)
    root = run.run_dir() / "checkpoints"
    locked_at = None
    try:
        run.start_controller()
        run.wait(
            lambda: root.exists() and 4 in [c.step for c in list_checkpoints(str(root))],
            timeout=240,
            what="step 4 committed",
            every=0.01,
        )
        lock(root, how)
        locked_at = time.monotonic()
        trained = run.step()
        while time.monotonic() - locked_at < OUTAGE_SECONDS:
            assert run.phase() == "running", [e.message for e in run.events()]
            time.sleep(0.5)
        trained = run.step() - trained
        unlock(root, how)
        locked_at = None
        _finish_and_compare(run, uninterrupted)
        assert [a.exit_class for a in run.attempts()] == ["Succeeded"]  # no restart, no hang verdict
        lines = run.run_dir() / "metrics-rank0.jsonl"
        step_lines = [json.loads(x) for x in lines.read_text().splitlines() if "step_seconds" in x]
        assert [x["step"] for x in step_lines] == list(range(STEPS)), step_lines  # each once: none recomputed
        gauge = [x["checkpoint_storage_outage_seconds"] for x in step_lines]
        assert gauge[0] == 0 and max(gauge) > 0  # the alert's metric grew during the outage
        logs = run.run_dir() / "logs" / "attempt-1"
        failed = re.compile(rf"checkpoint step (\d+) not saved, storage unavailable at {root}: ")
        for rank in (0, 1):
            text = (logs / f"rank-{rank}.log").read_text()
            assert failed.search(text) and "checkpoint storage is back after" in text, text[-3000:]
        saves = sorted({int(m) for m in failed.findall((logs / "rank-0.log").read_text())})
        committed = [c.step for c in list_checkpoints(str(root))]
        assert committed[-1] == STEPS and not [p for p in root.iterdir() if ".tmp" in p.name], committed
        assert not [e for e in run.events() if e.type == "Failure"]
        waits = [json.loads(x) for x in lines.read_text().splitlines() if "step_seconds" not in x]
        waited = [x for x in waits if x.get("checkpoint_storage_outage_seconds", 0) > 0]
        print(
            f"\n[storage outage] {trained} steps trained while {root.name} was unwritable for "
            f"{OUTAGE_SECONDS:.0f} s; failed saves of steps {saves}; {len(waited)} outage reports while waiting "
            f"after the last step; committed {committed}; {STEPS} losses bitwise equal"
        )
    finally:
        if locked_at is not None:
            unlock(root, how)
        run.stop()


def _coordinator_status(run: JobRun) -> dict | None:
    attempts = [a for a in run.attempts() if a.backend_record and a.backend_record.get("coordinator_url")]
    if not attempts:
        return None
    try:
        with urllib.request.urlopen(
            attempts[-1].backend_record["coordinator_url"] + "/v1/status", timeout=5
        ) as r:
            return json.loads(r.read())
    except OSError:
        return None


def _node_worker(run: JobRun, name: str) -> psutil.Process:
    """The trainer process of a node or hot spare node of the newest attempt, as its record names it (its
    shell's descendant running trainer.train, not its torchrun)."""
    record = run.attempts()[-1].backend_record
    (node,) = [n for n in (*record["nodes"], *record["spares"]) if n["name"] == name]
    workers = [
        p
        for p in psutil.Process(node["pid"]).children(recursive=True)
        if "trainer.train" in " ".join(p.cmdline()) and "torch.distributed.run" not in p.cmdline()
    ]
    assert len(workers) == 1, workers
    return workers[0]


def test_in_place_recovery_through_lost_spares_ranks_and_controller_then_a_disk_fallback(
    data, uninterrupted, tmp_path: Path
) -> None:
    """`fault_tolerance.recovery: in-place`, two hot spares. Rank 0 keeps its process through 1-5:

    1. spare 0 is SIGKILLed while it waits: the controller starts spare 2 in its place (SpareLost);
    2. rank 1 dies halfway through copying its snapshot of step 4: the ranks go back to step 3, never to the
       half-made snapshot (and rank 1's keeper never received a replica of 4);
    3. spare 1, given rank 1, dies halfway through its restore: the survivors move on to the next round, where
       spare 2 takes rank 1 from the same replica (round 1 superseded);
    4. spare 2 is SIGSTOPped once it has trained a step after the recovery: after the hang timeout the controller
       kills it and gives rank 1 to spare 3, started after the last recovery;
    5. the controller is SIGKILLed as soon as that recovery starts, and a new one finishes following it;
    6. once step 8 is checkpointed, rank 0 and rank 1 (each the other's replica keeper) are killed together:
       no memory holds their state, the in-place path declines and the job restarts from the disk checkpoint.

    Every loss record, first run and redone alike, equals the uninterrupted run's bit for bit."""
    spec = _spec(
        "in-place",
        data,
        # A hang is 10 s without progress, or 10 median steps when longer (the product's factor, not the
        # harness's 5): on a loaded CI machine a step with a checkpoint save can take well over 5 medians, and a
        # false hang verdict there kills a healthy rank (rank 0, whose process the test follows).
        fault_tolerance={
            "recovery": "in-place",
            "hot_spares": 2,
            "hang_timeout_seconds": 10,
            "hang_step_factor": 10,
        },
    )
    faults = {
        "VLCTL_FAULT_CRASH_AT_STEP": "4",
        "VLCTL_FAULT_CRASH_MODE": "kill",
        "VLCTL_FAULT_CRASH_IN": "snapshot,restore",
        "VLCTL_FAULT_RANK": "1",  # each spare that takes rank 1 inherits the faults: each fires once per job
        "VLCTL_FAULT_ONCE_DIR": str(tmp_path / "once"),
    }
    run = JobRun(tmp_path, spec, env=faults)
    root = run.run_dir() / "checkpoints"
    try:
        run.start_controller()
        survivor = run.rank_pid(0, attempt=1)

        # 1. Spare 0 dies while it waits for an assignment.
        run.wait(
            lambda: "in-place-spare-0/0" in ((_coordinator_status(run) or {}).get("spares_waiting") or []),
            timeout=240,
            what="spare 0 waiting",
            every=0.2,
        )
        _node_worker(run, "in-place-spare-0").kill()
        run.wait(lambda: any(e.reason == "SpareLost" for e in run.events()), timeout=60, what="SpareLost")

        # `vlctl status` shows the spares and the newest committed snapshot step (asked of the coordinator).
        shown = subprocess.run(
            [sys.executable, "-m", "cli", "status", "in-place", "-o", "json"],
            cwd=train_harness.REPO, env=run.env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        in_place = json.loads(shown.stdout)["in_place"]
        assert in_place["round"] == 0 and "committed_step" in in_place, in_place  # none yet, this early
        names = [s["name"] for s in in_place["spares"]]
        assert "in-place-spare-0" not in names and "in-place-spare-2" in names, in_place
        assert {s["state"] for s in in_place["spares"]} <= {"waiting", "starting"}, in_place

        # 2-3 come from the ranks' own faults.
        def round_started(k: int) -> bool:
            return any(e.reason == "InPlaceRecoveryStarted" and e.data["round"] == k for e in run.events())

        def round_recovered(k: int) -> bool:
            return any(e.reason == "RecoveredInPlace" and e.data["round"] == k for e in run.events())

        # 4. Spare 2 stopped one step after it resumed (a step line of rank 0's written after the recovery).
        run.wait(lambda: round_recovered(2) or str(run.phase()) in ("succeeded", "failed"), timeout=300,
                 what="the second in-place recovery", every=0.05)  # fmt: skip
        back = next(e for e in run.events() if e.reason == "RecoveredInPlace").data["resumed_at"]
        stopped = _node_worker(run, "in-place-spare-2")
        run.wait(
            lambda: run.first_step_after(back), timeout=120, what="a step after the recovery", every=0.02
        )
        stopped.send_signal(signal.SIGSTOP)

        # 5. The controller is killed when round 3 starts.
        run.wait(lambda: round_started(3) or str(run.phase()) in ("succeeded", "failed"), timeout=300,
                 what="the third in-place recovery to start", every=0.02)  # fmt: skip
        assert psutil.pid_exists(survivor)  # rank 0 kept its process through the recoveries so far
        run.kill_controller()
        run.start_controller("ctl-test-2")

        # 6. Rank 0 and rank 1 together, right after step 8 is checkpointed (whether or not the new controller
        # has taken over yet: it finds both nodes failed).
        run.wait(
            lambda: root.exists() and 8 in [c.step for c in list_checkpoints(str(root))],
            timeout=240,
            what="step 8 checkpointed",
            every=0.01,
        )
        assert psutil.pid_exists(survivor), f"rank 0's process ended before step 8 was saved\n{run.story()}"
        both = [psutil.Process(survivor), _node_worker(run, "in-place-spare-3")]
        for proc in both:
            proc.kill()
        run.wait(lambda: len(run.attempts()) == 2, timeout=240, what="the restart from the disk checkpoint")

        _finish_and_compare(run, uninterrupted)
        records = [json.loads(x) for x in (run.run_dir() / "metrics-rank0.jsonl").read_text().splitlines()]
        redone = [(r["step"], r["loss"]) for r in records if "loss" in r and "step_seconds" in r]
        assert all(loss == uninterrupted[step] for step, loss in redone), redone  # every record, bitwise
        events = run.events()
        messages = [e.message for e in events]

        lost_spare = next(e for e in events if e.reason == "SpareLost")
        assert lost_spare.data["spare"] == "in-place-spare-0", lost_spare.message
        assert lost_spare.data["replacement"] == "in-place-spare-2", lost_spare.message
        started = [e for e in events if e.reason == "InPlaceRecoveryStarted"]
        assert [(e.data["node"], e.data["spare"], e.data["round"]) for e in started] == [
            ("local-1", "in-place-spare-1", 1),  # the kill halfway through a snapshot
            ("in-place-spare-1", "in-place-spare-2", 2),  # its newcomer lost while restoring
            ("in-place-spare-2", "in-place-spare-3", 3),  # the hung newcomer, killed
        ], messages
        assert started[1].data["superseded"] == [1]
        recovered = {e.data["round"]: e for e in events if e.reason == "RecoveredInPlace"}
        assert sorted(recovered) == [2, 3], messages
        # The half-made snapshot of step 4 was never used: back to step 3, one completed step done again,
        # counted from the first failure (round 1's survivors had done 4 steps).
        assert recovered[2].data["step"] == 3 and recovered[2].data["steps_lost"] == 1, recovered[2].message
        assert recovered[2].data["died_at"] <= started[1].time.timestamp()
        assert recovered[3].data["steps_lost"] <= 1, recovered[3].message
        hung = next(e for e in events if e.reason == "HungRanksKilled")
        assert hung.data["node"] == "in-place-spare-2" and hung.data["ranks"] == [1]
        assert not any(psutil.pid_exists(pid) for pid in hung.data["pids"])  # never two processes for rank 1
        # Its outage counts from the stall, not from the kill: the hang limit (at least 10 s) waited out trained
        # nothing.
        assert recovered[3].data["died_at"] <= hung.time.timestamp() - 9, (recovered[3].data, hung.time)
        assert started[2].time < recovered[3].time
        assert [e.data["spare"] for e in events if e.reason == "SpareStarted"][:1] == ["in-place-spare-3"]

        # 6: declined with the reason, then the restart path: one Failure, attempt 2 from step 8.
        declined = next(e for e in events if e.reason == "InPlaceRecoveryDeclined")
        assert declined.data["nodes"] == ["in-place-spare-3", "local-0"], declined.message
        assert "lost together" in declined.message
        attempts = run.attempts()
        assert [a.number for a in attempts] == [1, 2] and attempts[1].resumed_from_step == 8, messages
        failures = [e for e in events if e.type == "Failure"]
        assert len(failures) == 1 and failures[0].seq > declined.seq, messages  # (its time is the death's)

        # `vlctl logs --rank 1` tells rank 1's whole story: each spare that took it writes on in rank-1.log.
        (rank1_log,) = tmp_path.rglob("attempt-1/rank-1.log")
        text = rank1_log.read_text()
        assert "rank 1 crash (kill) halfway through the snapshot of step 4" in text
        assert "rank 1 crash (kill) halfway through restoring step 3" in text
        for k in (1, 2, 3):
            assert f"rank 1 joined round {k}" in text, text[-3000:]
        # Rank 0 started once in attempt 1 and went through every round in that process.
        rank0 = (rank1_log.parent / "rank-0.log").read_text()
        assert rank0.count("rank 0 joined round 0 ") == 1 and "rank 0 joined round 3 " in rank0
        print(
            f"\n[in-place] {recovered[2].message}\n[in-place, after the hang] {recovered[3].message}"
            f"\n[in-place, both ranks lost] {declined.message}"
        )
    finally:
        run.stop()
