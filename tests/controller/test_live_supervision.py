"""The controller supervising real distributed processes over hundreds of steps: stragglers slowed from outside,
a clean run, a crash loop, and two controllers on one PostgreSQL.

The ranks run `step_trainer` (real torchrun, gloo collectives and the trainer's own telemetry, a busy loop for
compute instead of the model) so a 300-step job takes seconds; see its docstring. Every assertion holds with both
cores kept busy by other processes (behaviour with margins, never wall-clock speed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from job_harness import JobRun, job_spec  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
HERE = Path(__file__).resolve().parent


def _spec(name: str, steps: int, **sections) -> dict:
    training = {
        "model": {"name": "tiny"},
        "data": {"paths": ["unused.jsonl"], "rows_per_step": 2},
        "parallel": {"dp": 2},
        "training": {"steps": steps},
        "checkpoint": {"interval_steps": 1000},
    }
    return job_spec(name, training, **sections)


def _run(tmp_path: Path, spec: dict, **env: str) -> JobRun:
    run = JobRun(tmp_path, spec, env={"PYTHONPATH": str(HERE), "STEP_TRAINER_WORK": "1500000", **env})
    run.start_controller(trainer_module="step_trainer")
    return run


def _own_work_ratio(run_dir: Path, *, since: int) -> float | None:
    """Median own work of rank 1 over rank 0's, over the steps from `since` that both ranks reported."""
    own = []
    for rank in (0, 1):
        values = {}
        for line in (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("own_work_seconds") is not None and record["step"] >= since:
                values[record["step"]] = record["own_work_seconds"]
        own.append(values)
    steps = sorted(set(own[0]) & set(own[1]))
    if len(steps) < 3:
        return None
    return statistics.median(own[1][s] for s in steps) / statistics.median(own[0][s] for s in steps)


def _slowed_from(run: JobRun, rank: int) -> int | None:
    """The step from which the step trainer's rank `rank` does more work (it says so in its log)."""
    log = run.run_dir() / "logs" / "attempt-1" / f"rank-{rank}.log"
    found = re.search(r"slowed from step (\d+)", log.read_text()) if log.exists() else None
    return int(found.group(1)) if found else None


# Windows of 40 steps of about 0.1 s: a window's median is steady against the scheduling noise of ranks that
# share 2 cores with the controller; the 1.3x slowdown must beat the own-baseline ratio threshold. With 20-step
# windows the test failed about 1 run in 5 on this machine when quiet (never next to CPU hogs): a second or two
# in which the whole VM ran slower covered part of a window, and the ratio of the two ranks' window medians read
# 1.02 for a 1.3x rank, which broke the persistence count. The detector now takes relative speed step by step
# (controller/stragglers.py), which cancels such slowdowns: over 11 quiet runs, the three windows after the
# slowdown read 1.18-1.39 step by step where the ratio of window medians read 1.01-1.49 (and 0.93-1.06 against
# 0.84-1.22 before it); the 5 runs with the step-aligned detector flagged within 2.65-2.80 windows.
STRAGGLERS = {"window": 40, "warmup_steps": 5, "persistence": 3, "ratio_threshold": 1.15}


def test_a_rank_slowed_1_3x_from_outside_is_flagged_within_the_configured_windows(tmp_path: Path) -> None:
    """The test tells rank 1, from outside, to become 1.3x slower: from its next step its compute takes 1.3x as
    long, as a host waiting for a GPU that slowed down would (see step_trainer). SIGSTOP from outside for part of
    each period, as this test did before, gave no steady slowdown on a machine whose cores other processes keep
    busy: a stopped process gets a head start from the scheduler when it resumes, which hid a varying share of
    the stop (issue 11: flagged 6.75 windows late on a loaded CI machine); 1.3x the CPU work gave 1.19-1.28x,
    since the slow rank gets a larger share of the cores while the fast one waits in its collective."""
    order = tmp_path / "slow.json"
    run = _run(tmp_path, _spec("slow-rank", 520, stragglers=STRAGGLERS), STEP_TRAINER_SLOW_FILE=str(order))
    window, persistence = STRAGGLERS["window"], STRAGGLERS["persistence"]
    try:
        # Baselines: warm-up plus 3 windows of normal speed. The test polls slowly throughout: it shares the 2
        # cores with the ranks, and a store query 20 times a second slowed the rank beside it enough to break a
        # window (seen in fresh-clone `make test` runs: rank 0 at 0.121 s against its 0.085 s for one window).
        run.wait_step(5 + 3 * window + 5, timeout=180, every=0.5)
        staged = tmp_path / "slow.json.tmp"
        # 1.4x the work (measured 1.36-1.43x by the ranks on a quiet machine). An order of 1.3x measured 1.19-1.28x,
        # too near the 1.15 threshold: in a fresh-clone `make test` (session 8) one window of the three read below
        # it and the rank was flagged 4.8 windows late. What is tested is the detector's persistence and latency,
        # not a threshold's edge.
        staged.write_text(json.dumps({"rank": 1, "factor": 1.4}))
        staged.replace(order)  # whole or absent: the rank never reads half an order
        slowed_from = run.wait(
            lambda: _slowed_from(run, 1), timeout=60, what="rank 1 slowing down", every=0.5
        )
        flagged = run.wait(
            lambda: [e for e in run.events() if e.reason == "StragglerFlagged"],
            timeout=180,
            what="the straggler flag",
            every=1.0,
        )
        event = flagged[0]
        assert event.data["rank"] == 1
        assert event.data["node"] == "local-1"
        # Flagged at the end of the `persistence`-th slow window, one more if the slowdown began mid-window.
        assert event.data["step"] >= slowed_from, (slowed_from, event.data)
        windows = (event.data["step"] + 1 - slowed_from) / window
        assert windows <= persistence + 1, (slowed_from, event.data)
        assert event.data["cause"] == "compute"
        reached = _own_work_ratio(run.run_dir(), since=slowed_from)
        # About 1.4x as the ranks measure it (1.36-1.46x seen, quiet and next to CPU hogs); 1.5 was too tight.
        assert reached is not None and 1.2 <= reached <= 1.7, reached
        print(
            f"\n[straggler] rank 1 slowed from step {slowed_from}, flagged at step {event.data['step']} "
            f"({windows:.2f} windows): slowdown {event.data['slowdown']:.2f}x, score {event.data['score']:.1f}, "
            f"ratio {event.data['ratio']:.2f}; own work measured by the ranks {reached:.2f}x"
        )
    finally:
        run.stop()


def test_a_clean_300_step_run_flags_nothing(tmp_path: Path) -> None:
    run = _run(tmp_path, _spec("clean-300", 300, stragglers=STRAGGLERS))
    try:
        assert run.wait_done(timeout=300) == "succeeded"
        assert [e.message for e in run.events() if e.type == "Straggler"] == []
        assert run.job().current_step == 300
    finally:
        run.stop()


def test_a_job_that_raises_before_its_first_step_fails_after_one_retry_as_a_user_error(
    tmp_path: Path,
) -> None:
    run = _run(tmp_path, _spec("crash-loop", 20), STEP_TRAINER_RAISE="1")
    try:
        assert run.wait_done(timeout=180) == "failed"
        job = run.job()
        assert job.phase_reason == "UserError"
        attempts = run.attempts()
        assert len(attempts) == 2  # the first try and one retry
        assert [a.exit_class for a in attempts] == ["CrashBeforeFirstStep", "CrashBeforeFirstStep"]
        print(f"\n[crash loop] {job.phase_reason}: {job.phase_message}")
    finally:
        run.stop()


def _tagged(job: str) -> list[int]:
    """Every live process (agent or rank) of `job`'s gangs, wherever it sits in the process tree."""
    import psutil

    from controller.backends.local import ENV_GANG

    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if env.get(ENV_GANG) and env.get("VLCTL_TRAINING_JOB") == job and proc.status() != "zombie":
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _failure(run: JobRun, attempt: int) -> str:
    return next(e.message for e in run.events() if e.type == "Failure" and e.attempt == attempt)


def test_agents_killed_and_controllers_stopped_from_outside(tmp_path: Path) -> None:
    """One job through four faults from outside (issue 11):

    1. SIGKILL of node local-1's torchrun agent: the Crash names local-1's agent and SIGKILL, not the healthy
       rank 0 that teardown stopped afterwards.
    2. SIGTERM to `vlctl controller` (default --on-exit stop): no process of the job is left, the job stays
       running in the store, and the next controller resumes it uncounted (Preempted).
    3. SIGTERM to `vlctl controller --on-exit detach`: the ranks keep training (the same pids, seconds later),
       and the next controller re-attaches without a new attempt.
    4. SIGKILL of node local-0's agent (the rendezvous host): the Crash names local-0's agent.
    """
    run = _run(tmp_path, _spec("ctl-exit", 100_000))
    try:
        run.wait_attempt_step(1, 5, timeout=120)
        os.kill(run.agent_pid(1, attempt=1), signal.SIGKILL)
        run.wait_attempt_step(2, 3)
        crash = _failure(run, 1)
        assert "torchrun agent of local-1" in crash and "SIGKILL" in crash, crash
        assert not crash.startswith("rank 0"), crash

        run.controller.send_signal(signal.SIGTERM)
        assert run.controller.wait(timeout=120) == 0  # teardown: up to grace + root exit, node by node
        assert _tagged("ctl-exit") == []  # no orphan: every rank and agent of the job is gone
        assert run.phase() == "running"  # the job itself goes on with the next controller

        run.start_controller("ctl-detach", trainer_module="step_trainer", extra_args=("--on-exit", "detach"))
        run.wait_attempt_step(3, 3)
        assert [a.exit_class for a in run.attempts()] == ["Crash", "Preempted", None]
        before = sorted(_tagged("ctl-exit"))
        assert len(before) >= 4  # two agents and two ranks (and the nodes' shells)
        run.controller.send_signal(signal.SIGTERM)
        assert run.controller.wait(timeout=120) == 0  # teardown: up to grace + root exit, node by node
        time.sleep(3)
        assert sorted(_tagged("ctl-exit")) == before  # detached: the same processes still train
        step = run.step()

        run.start_controller("ctl-next", trainer_module="step_trainer")
        run.wait(lambda: run.step() > step, timeout=120, what="progress after the re-attach")
        assert len(run.attempts()) == 3 and sorted(_tagged("ctl-exit")) == before

        os.kill(run.agent_pid(0, attempt=3), signal.SIGKILL)
        run.wait_attempt_step(4, 3)
        crash = _failure(run, 3)
        assert "torchrun agent of local-0" in crash and "SIGKILL" in crash, crash
        assert [a.exit_class for a in run.attempts()][:3] == ["Crash", "Preempted", "Crash"]
        job = run.job()
        assert job.num_restarts_counted == 2 and job.phase == "running"
        print(f"\n[faults from outside] {_failure(run, 1)} | {crash}")
    finally:
        run.stop()


def test_vlctl_run_ignores_an_ignored_sigint_and_cancels_on_sigterm(tmp_path: Path) -> None:
    """`(trap '' INT; exec vlctl run spec) &` then SIGINT: nothing happens (the ranks train on, no restart);
    then SIGTERM: the job ends cancelled, as Ctrl-C would, no process is left, exit status 143, and the JSON
    result names the attempt's start (issue 11: SIGTERM left the job `running` for the next controller to resume
    as a Crash, and an ignored SIGINT stopped the ranks and then restarted them)."""
    import yaml
    from sqlalchemy import select

    from controller.store import migrate
    from controller.store.models import Attempt, Job
    from controller.store.session import StoreConfig, open_store

    spec = _spec("fg-run", 100_000)
    samples = tmp_path / "samples.jsonl"  # submit checks that local data exists; the step trainer reads none
    samples.write_text('{"text": "unused"}\n')
    spec["training"]["data"]["paths"] = [str(samples)]
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{tmp_path / 'vlctl.db'}"
    store = open_store(StoreConfig(url=url))
    migrate.upgrade(store)
    env = {
        **os.environ,
        "VLCTL_DATABASE_URL": url,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE),
        "STEP_TRAINER_WORK": "1500000",
    }
    command = [
        sys.executable, "-m", "cli", "run", str(spec_file), "-o", "json", "--poll-seconds", "0.3",
        "--runs-root", str(tmp_path / "runs"), "--trainer-module", "step_trainer",
    ]  # fmt: skip
    import shlex
    import subprocess

    proc = subprocess.Popen(
        ["/bin/bash", "-c", f"trap '' INT; exec {shlex.join(command)}"],
        cwd=HERE.parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def job() -> Job | None:
        with store.read() as session:
            found = session.scalars(select(Job).where(Job.name == "fg-run")).first()
            if found is not None:
                session.expunge(found)
            return found

    def wait(check, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := check():
                return value
            assert proc.poll() is None, (what, proc.returncode, proc.stderr.read()[-2000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    try:
        wait(lambda: (j := job()) is not None and (j.current_step or 0) >= 3, "step 3")
        ranks = sorted(_tagged("fg-run"))
        proc.send_signal(signal.SIGINT)
        step = job().current_step
        wait(lambda: job().current_step >= step + 5, "5 more steps after SIGINT")
        assert proc.poll() is None
        assert sorted(_tagged("fg-run")) == ranks  # the same processes train on
        assert job().phase == "running" and job().num_restarts == 0

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        result = json.loads(out)
        assert result["phase"] == "cancelled" and result["attempt_started"] is not None, result
        assert "SIGTERM" in result["message"]
        assert _tagged("fg-run") == []
        final = job()
        assert final.phase == "cancelled" and final.num_restarts == 0
        with store.read() as session:
            assert [a.exit_class for a in session.scalars(select(Attempt))] == ["Cancelled"]
        print(
            f"\n[vlctl run] SIGINT ignored for {final.current_step - step} steps; SIGTERM: {result['message']}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        from controller.backends.local import LocalBackend

        LocalBackend().reap("fg-run")
        store.dispose()
