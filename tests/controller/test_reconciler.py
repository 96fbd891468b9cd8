"""The reconcile loop's decisions, pass by pass, on an in-memory backend (tests/controller/fake_backend.py).

Each test scripts what the world does (nodes exit, ranks report steps, checkpoints appear on disk, the clock
moves) and checks what the controller made of it: phases, events in order, attempts, the config file of every
launch, calls on the gang. Real SQLite (PostgreSQL for the race between controllers, and as well as SQLite for
the tests marked `on_each_store`), real checkpoint folders with manifests; no process, so the whole file runs in
seconds. The end-to-end runs with real trainers are in
test_fault_matrix.py and test_live_supervision.py.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_backend import (  # noqa: E402
    SIGTERM_CODE,
    ControllerDied,
    FakeBackend,
    FakeClock,
    FakeGang,
    corrupt_checkpoint,
)

from controller import states  # noqa: E402
from controller.backends.base import EXIT_LOST  # noqa: E402
from controller.domain.phases import EventType, Phase  # noqa: E402
from controller.policy import CheckpointIntervalPolicy, auto_checkpoint_interval  # noqa: E402
from controller.reconciler import Controller, ControllerConfig  # noqa: E402
from controller.store import Store, StoreConfig, open_store  # noqa: E402
from controller.store.migrate import upgrade  # noqa: E402
from controller.store.models import Attempt, Checkpoint, Event, Job, NodeHealth, RankStatus  # noqa: E402
from controller.store.records import exclude_node  # noqa: E402
from controller.store.repo import create_job  # noqa: E402

DRAW = 0.5  # the backoff's random draw: restart 1 with base 4 s waits 3 + 0.5 x (4 - 3) = 3.5 s
FIRST_BACKOFF = 3.5
GRACE = 15.0  # ControllerConfig's default cancel grace


def pick(data: Any, expected: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` under `expected`'s keys, to compare the two with a readable diff."""
    assert data is not None
    return {key: data.get(key, "<missing>") for key in expected}


# ------------------------------------------------------------------------------------------ the world


def spec(
    name: str,
    *,
    nodes: int = 2,
    procs: int = 1,
    spares: int = 0,
    steps: int = 20,
    interval: int | str = 4,
    max_restarts: int = 3,
    stragglers: dict[str, Any] | None = None,
    backend: str = "local",
) -> dict[str, Any]:
    return {
        "name": name,
        "backend": backend,
        "resources": {"nodes": nodes, "procs_per_node": procs, "spare_nodes": spares},
        "training": {
            "model": {"name": "2b"},
            "data": {"paths": ["data.jsonl"], "rows_per_step": 8, "micro_batch_rows": 1},
            "parallel": {"dp": nodes * procs},
            "training": {"steps": steps, "warmup_steps": 0},
            "checkpoint": {"interval_steps": interval if isinstance(interval, int) else 4},
        },
        "checkpoint_policy": {"interval": interval, "min_interval_steps": 1},
        "fault_tolerance": {
            "max_restarts": max_restarts,
            "backoff_base_seconds": 4,
            "backoff_max_seconds": 60,
            "hang_timeout_seconds": 60,
            "hang_step_factor": 5,
            "startup_timeout_seconds": 120,
        },
        "stragglers": {"window": 5, "warmup_steps": 0, "persistence": 2, **(stragglers or {})},
    }


@dataclass
class World:
    store: Store
    clock: FakeClock
    backend: FakeBackend
    runs: Path

    def controller(self, controller_id: str = "ctl-a", **config: Any) -> Controller:
        return Controller(
            self.store,
            backends={"local": self.backend},
            config=ControllerConfig(controller_id=controller_id, runs_root=self.runs, **config),
            clock=self.clock,
            draw=lambda: DRAW,
        )

    def submit(self, raw: dict[str, Any]) -> str:
        with self.store.transaction() as session:
            create_job(session=session, name=raw["name"], spec=raw, now=self.now_dt())
        return raw["name"]

    def now_dt(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def job(self, name: str) -> Job:
        with self.store.read() as session:
            job = session.scalars(select(Job).where(Job.name == name)).one()
            session.expunge(job)
            return job

    def rows(self, model: Any, name: str, order: Any = None) -> list[Any]:
        with self.store.read() as session:
            job_id = session.scalars(select(Job.id).where(Job.name == name)).one()
            stmt = select(model).where(model.job_id == job_id)
            rows = list(session.scalars(stmt.order_by(order if order is not None else model.id)))
            session.expunge_all()
            return rows

    def events(self, name: str) -> list[Event]:
        return self.rows(Event, name, Event.seq)

    def reasons(self, name: str) -> list[str]:
        return [e.reason for e in self.events(name)]

    def event(self, name: str, reason: str) -> Event:
        found = [e for e in self.events(name) if e.reason == reason]
        assert len(found) == 1, (reason, [(e.reason, e.message) for e in self.events(name)])
        return found[0]

    def failure(self, name: str, reason: str) -> Event:
        found = [e for e in self.events(name) if e.type == EventType.FAILURE and e.reason == reason]
        assert len(found) == 1, (reason, [(e.reason, e.message) for e in self.events(name)])
        return found[0]

    def attempts(self, name: str) -> list[Attempt]:
        return self.rows(Attempt, name, Attempt.number)

    def transition(self, name: str, change: Any, **kwargs: Any) -> None:
        """A person's state change (cancel, reopen) at the fake clock's time."""
        with self.store.transaction() as session:
            job = session.scalars(select(Job).where(Job.name == name)).one()
            change(job, session=session, now=self.now_dt(), **kwargs)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per module; every test starts from a copy (migrations take most of a second)."""
    path = tmp_path_factory.mktemp("template") / "vlctl.db"
    store = open_store(StoreConfig(url=f"sqlite:///{path}"))
    upgrade(store)
    store.dispose()
    return path


@pytest.fixture
def world(request: pytest.FixtureRequest, template_db: Path, tmp_path: Path) -> Iterator[World]:
    """On a copy of the migrated SQLite template, or on a fresh PostgreSQL schema for `on_each_store` tests."""
    if getattr(request, "param", "sqlite") == "postgresql":
        store = open_store(StoreConfig(url=request.getfixturevalue("postgres_only_url")))
        upgrade(store)
    else:
        db = tmp_path / "vlctl.db"
        shutil.copyfile(template_db, db)
        store = open_store(StoreConfig(url=f"sqlite:///{db}"))
    clock = FakeClock()
    try:
        yield World(store, clock, FakeBackend(clock), tmp_path / "runs")
    finally:
        store.dispose()


# The records these tests read back (classifications, decisions and their numbers) must be the same on both.
on_each_store = pytest.mark.parametrize("world", ["sqlite", "postgresql"], indirect=True)


# ------------------------------------------------------------------------------------------ scripts


def start(world: World, ctl: Controller, name: str, *, startup: float = 5.0) -> FakeGang:
    """Launch the job's next attempt and take its first step: the job is running."""
    ctl.reconcile_once()
    gang = world.backend.gang(name)
    assert world.job(name).phase is Phase.LAUNCHING
    world.clock.advance(startup)
    gang.run_steps(1)
    ctl.reconcile_once()
    assert world.job(name).phase is Phase.RUNNING
    return gang


def steps(
    world: World, ctl: Controller, gang: FakeGang, count: int, *, step_seconds: float = 1.0, **kw: Any
) -> None:
    world.clock.advance(count * step_seconds)
    gang.run_steps(count, step_seconds=step_seconds, **kw)
    ctl.reconcile_once()


def crash(
    world: World, ctl: Controller, gang: FakeGang, *, rank: int = 0, code: int = 1, log: str = ""
) -> None:
    world.clock.advance(1)
    gang.crash(rank, code, log=log)
    ctl.reconcile_once()


def wait_backoff(world: World, ctl: Controller, name: str) -> None:
    """Move the clock to the end of the backoff and pass once: the next attempt launches."""
    job = world.job(name)
    assert job.phase is Phase.RESTARTING and job.next_attempt_at is not None
    world.clock.now = max(world.clock.now, job.next_attempt_at.timestamp())
    ctl.reconcile_once()


# ------------------------------------------------------------------------------------------ the happy path


def test_a_job_goes_pending_launching_running_succeeded_with_its_records(world: World) -> None:
    ctl = world.controller()
    t0 = world.clock()
    name = world.submit(spec("ok", steps=8, interval=4))

    ctl.reconcile_once()
    job = world.job(name)
    assert (job.phase, job.current_attempt, job.total_steps) == (Phase.LAUNCHING, 1, 8)
    assert job.run_dir == str(world.runs / name)
    [launch] = world.backend.launches_of(name)
    assert launch.nodes == ["node-0", "node-1"] and launch.procs_per_node == 1
    assert launch.config_path == world.runs / name / "vlctl" / "attempt-1.json"
    assert launch.config["run_dir"] == str(world.runs / name) and launch.config["job_name"] == name
    expected = {"resume": "none", "resume_step": None, "interval_steps": 4}
    assert pick(launch.config["checkpoint"], expected) == expected
    gang = world.backend.gang(name)

    world.clock.advance(5)
    gang.run_steps(1)  # step index 0 ends at t0 + 5
    ctl.reconcile_once()
    job = world.job(name)
    assert (job.phase, job.current_step, job.loss) == (Phase.RUNNING, 1, 2.0)
    [attempt] = world.attempts(name)
    assert attempt.first_step_at is not None and attempt.first_step_at.timestamp() == t0 + 5
    assert attempt.backend_record == gang.record()
    rows = world.rows(RankStatus, name, RankStatus.rank)
    assert [(r.rank, r.node, r.step, r.pid, r.flagged) for r in rows] == [
        (0, "node-0", 0, gang.rank_pids()[0], False),
        (1, "node-1", 0, gang.rank_pids()[1], False),
    ]

    steps(world, ctl, gang, 7)  # to step 8, saving at 4 and 8
    assert world.job(name).current_step == 8
    world.clock.advance(1)
    gang.succeed()
    ctl.reconcile_once()

    job = world.job(name)
    assert job.phase is Phase.SUCCEEDED and job.finished_at is not None
    assert job.finished_at.timestamp() == t0 + 13
    assert [(e.type, e.reason) for e in world.events(name)] == [
        (EventType.SUBMITTED, "Submitted"),
        (EventType.PHASE_CHANGED, "Launched"),
        (EventType.PHASE_CHANGED, "RanksStarted"),
        (EventType.CHECKPOINT, "CheckpointCommitted"),
        (EventType.CHECKPOINT, "CheckpointCommitted"),
        (EventType.PHASE_CHANGED, "Completed"),
    ]
    [attempt] = world.attempts(name)
    assert (attempt.last_step, attempt.exit_class, attempt.failed_at) == (8, "Succeeded", None)
    assert attempt.ended_at is not None and attempt.ended_at.timestamp() == t0 + 13
    assert attempt.checkpoint_stall_seconds == 1.0  # two stages of 0.5 s on rank 0
    ckpts = world.rows(Checkpoint, name, Checkpoint.step)
    assert [(c.step, c.committed, c.save_seconds, c.attempt) for c in ckpts] == [
        (4, True, 0.5, 1),
        (8, True, 0.5, 1),
    ]
    assert job.last_checkpoint_step == 8
    # 13 s of wall time: 5 s start-up, 8 s of steps of which 1 s blocked by checkpoints.
    assert job.ettr is not None and 0.0 <= job.ettr <= 1.0
    assert job.productive_seconds == pytest.approx(7.0)
    assert job.ettr == pytest.approx(7.0 / 13.0)
    assert job.lost_seconds["startup"] == pytest.approx(5.0)
    assert job.lost_seconds["checkpoint_stall"] == pytest.approx(1.0)
    ctl.reconcile_once()  # the job is over: nothing is left to stop
    assert gang.cancels == [] and gang.detaches == 0


def test_the_first_step_time_is_the_first_steps_end_when_one_poll_reads_several(world: World) -> None:
    ctl = world.controller()
    t0 = world.clock()
    name = world.submit(spec("burst"))
    ctl.reconcile_once()
    gang = world.backend.gang(name)
    world.clock.advance(6)
    gang.run_steps(3, step_seconds=1.5)  # steps end at t0 + 3, t0 + 4.5 and t0 + 6, read by one poll
    ctl.reconcile_once()
    [attempt] = world.attempts(name)
    assert attempt.first_step_at is not None and attempt.first_step_at.timestamp() == t0 + 3
    assert world.job(name).lost_seconds["startup"] == pytest.approx(3.0)


def test_checkpoints_the_trainer_pruned_leave_the_store(world: World) -> None:
    ctl = world.controller(checkpoint_scan_seconds=1.0)
    name = world.submit(spec("prune", steps=40, interval=4))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 11)  # checkpoints at 4, 8 and 12
    assert [c.step for c in world.rows(Checkpoint, name, Checkpoint.step)] == [4, 8, 12]
    shutil.rmtree(gang.checkpoint_root / "step-00000004")  # keep_last
    steps(world, ctl, gang, 1)
    assert [c.step for c in world.rows(Checkpoint, name, Checkpoint.step)] == [8, 12]
    assert world.reasons(name).count("CheckpointCommitted") == 3
    assert world.job(name).last_checkpoint_step == 12


# ------------------------------------------------------------------------------------------ failures


@on_each_store
def test_a_rank_crash_restarts_after_the_backoff_from_the_newest_checkpoint(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("crash", steps=20, interval=4))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 9)  # step 10; checkpoints at 4 and 8
    died_at = world.clock.advance(1)
    gang.crash(1, log="Traceback (most recent call last):\nRuntimeError: boom\n")
    detected_at = world.clock.advance(0.5)  # the next pass
    ctl.reconcile_once()

    failure = world.failure(name, "Crash")
    assert failure.type == EventType.FAILURE and failure.attempt == 1
    assert failure.data is not None
    expected = {
        "exit_class": "Crash",
        "step": 10,
        "ranks": [1],
        "retryable": True,
        "counts_toward_limit": True,
        "detection_seconds": 0.5,  # from the agent's record of the rank's death to the pass that saw it
    }
    assert pick(failure.data, expected) == expected
    assert failure.message == "rank 1 (node-1) exited with code 1: RuntimeError: boom"
    assert gang.cancels == [GRACE]  # node-0 would wait at torchrun's exit barrier
    assert gang.poll() == {"node-0": SIGTERM_CODE, "node-1": 1}
    job = world.job(name)
    assert (job.phase, job.num_restarts, job.num_restarts_counted) == (Phase.RESTARTING, 1, 1)
    assert job.next_attempt_at is not None and job.next_attempt_at.timestamp() == detected_at + FIRST_BACKOFF
    [attempt] = world.attempts(name)
    assert (attempt.exit_class, attempt.last_step) == ("Crash", 10)
    # The classification, typed on the attempt: what the restart policy's history is read from.
    assert (attempt.retryable, attempt.counts_toward_limit, attempt.failure_step) == (True, True, 10)
    assert attempt.failure_message == failure.message
    assert attempt.failed_at is not None and attempt.failed_at.timestamp() == died_at
    assert attempt.detected_at == attempt.ended_at and attempt.ended_at is not None
    assert attempt.ended_at.timestamp() == detected_at
    assert world.reasons(name)[-2:] == ["Crash", "RestartScheduled"]

    world.clock.advance(FIRST_BACKOFF - 0.25)
    ctl.reconcile_once()
    assert world.job(name).phase is Phase.RESTARTING and len(world.backend.launches) == 1
    world.clock.advance(0.25)
    ctl.reconcile_once()

    job = world.job(name)
    assert (job.phase, job.current_attempt) == (Phase.LAUNCHING, 2)
    second = world.backend.launches_of(name)[1]
    expected = {"resume": "latest", "resume_step": 8}
    assert pick(second.config["checkpoint"], expected) == expected
    assert second.config_path.name == "attempt-2.json"
    assert world.attempts(name)[1].resumed_from_step == 8
    assert world.backend.gang(name, 2).step == 8  # the fake trainer loads what the config names
    assert [c.verified for c in world.rows(Checkpoint, name, Checkpoint.step)] == [None, True]


def test_a_corrupt_newest_checkpoint_is_recorded_and_the_restart_falls_back(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("corrupt", steps=20, interval=4))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 9)
    crash(world, ctl, gang)
    bad = corrupt_checkpoint(gang.checkpoint_root, 8)
    wait_backoff(world, ctl, name)

    event = world.event(name, "CheckpointCorrupt")
    assert event.data is not None and event.data["step"] == 8
    assert "rank-00000.pt has CRC-32" in event.message and str(bad.parent) in event.message
    second = world.backend.launches_of(name)[1]
    assert second.config["checkpoint"]["resume_step"] == 4
    ckpts = {c.step: c.verified for c in world.rows(Checkpoint, name)}
    assert ckpts == {4: True, 8: False}
    job = world.job(name)
    assert job.last_checkpoint_step == 4 and world.attempts(name)[1].resumed_from_step == 4
    reasons = world.reasons(name)
    assert reasons.index("CheckpointCorrupt") < reasons.index("Launched", reasons.index("Crash"))


@on_each_store
def test_the_same_crash_at_the_same_step_three_times_is_a_crash_loop(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("loop", steps=40, interval=4, max_restarts=10))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 5)  # step 6, checkpoint at 4
    crash(world, ctl, gang)
    for attempt in (2, 3):
        wait_backoff(world, ctl, name)
        gang = world.backend.gang(name, attempt)
        assert gang.step == 4
        world.clock.advance(1)
        gang.run_steps(1)
        ctl.reconcile_once()
        steps(world, ctl, gang, 1)  # step 6 again
        crash(world, ctl, gang)

    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.FAILED, "CrashLoop")
    assert job.phase_message.startswith("Crash 3 times at step 6; last: rank 0 (node-0) exited with code 1")
    assert len(world.backend.launches_of(name)) == 3 and job.num_restarts == 2
    assert [a.exit_class for a in world.attempts(name)] == ["Crash", "Crash", "Crash"]
    assert job.claimed_by is None and job.finished_at is not None


def test_failures_beyond_max_restarts_fail_the_job(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("limit", steps=40, interval=4, max_restarts=2))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 4)  # step 5
    crash(world, ctl, gang)
    for attempt, more in ((2, 2), (3, 3)):  # crashes at steps 6 and 7: no loop, just too many
        wait_backoff(world, ctl, name)
        gang = world.backend.gang(name, attempt)
        world.clock.advance(1)
        gang.run_steps(1)
        ctl.reconcile_once()
        steps(world, ctl, gang, more - 1)
        crash(world, ctl, gang)

    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.FAILED, "ReachedMaxRestarts")
    assert job.phase_message.startswith("3 failures exceed max_restarts=2")
    assert [a.last_step for a in world.attempts(name)] == [5, 6, 7]
    assert job.num_restarts_counted == 2


def test_the_trainers_config_error_exit_code_fails_the_job_at_once(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("config", max_restarts=5))
    gang = start(world, ctl, name)
    crash(world, ctl, gang, rank=0, code=2)

    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.FAILED, "ConfigError")
    assert "exited with code 2 (invalid configuration)" in job.phase_message
    failure = world.failure(name, "ConfigError")
    assert failure.data is not None and failure.data["retryable"] is False
    assert len(world.backend.launches) == 1 and job.num_restarts == 0


@on_each_store
def test_two_crashes_before_the_first_step_are_a_user_error(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("early", max_restarts=5))
    ctl.reconcile_once()
    crash(world, ctl, world.backend.gang(name), log="ImportError: no module named foo\n")
    assert world.job(name).phase is Phase.RESTARTING
    assert world.event(name, "CrashBeforeFirstStep").data["step"] is None  # type: ignore[index]
    wait_backoff(world, ctl, name)
    crash(world, ctl, world.backend.gang(name, 2), log="ImportError: no module named foo\n")

    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.FAILED, "UserError")
    assert job.phase_message.startswith("CrashBeforeFirstStep 2 times before the first step")
    assert job.phase_message.endswith("ImportError: no module named foo")
    assert [a.first_step_at for a in world.attempts(name)] == [None, None]


@on_each_store
def test_reopening_a_job_starts_its_crash_loop_history_over(world: World) -> None:
    """The history is the attempts after the latest reopen: a third crash before the first step, the first since a
    person reopened the job, is retried rather than called a user error again."""
    ctl = world.controller()
    name = world.submit(spec("again", max_restarts=5))
    ctl.reconcile_once()
    crash(world, ctl, world.backend.gang(name), log="ImportError: no module named foo\n")
    wait_backoff(world, ctl, name)
    crash(world, ctl, world.backend.gang(name, 2), log="ImportError: no module named foo\n")
    assert world.job(name).phase_reason == "UserError"

    world.clock.advance(60)
    world.transition(name, states.reopen)
    ctl.reconcile_once()
    crash(world, ctl, world.backend.gang(name, 3), log="ImportError: no module named foo\n")
    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.RESTARTING, "RestartScheduled")
    wait_backoff(world, ctl, name)
    crash(world, ctl, world.backend.gang(name, 4), log="ImportError: no module named foo\n")
    assert world.job(name).phase_reason == "UserError"
    attempts = world.attempts(name)
    assert [(a.exit_class, a.retryable, a.counts_toward_limit, a.failure_step) for a in attempts] == [
        ("CrashBeforeFirstStep", True, True, None)
    ] * 4


def test_a_lost_node_restarts_without_counting(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("lost", max_restarts=0))
    gang = start(world, ctl, name)
    world.clock.advance(1)
    gang.exit_node("node-1", EXIT_LOST)
    ctl.reconcile_once()
    job = world.job(name)
    assert (job.phase, job.num_restarts, job.num_restarts_counted) == (Phase.RESTARTING, 1, 0)
    assert world.event(name, "NodeLost").message == "lost node node-1"


def test_an_out_of_memory_error_in_the_rank_log_is_classified_as_such(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("oom"))
    gang = start(world, ctl, name)
    crash(
        world, ctl, gang, rank=1, log="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n"
    )
    assert world.event(name, "OutOfMemory").data["ranks"] == [1]  # type: ignore[index]
    assert world.job(name).phase is Phase.RESTARTING


def test_local_ranks_are_launched_with_their_memory_limit(world: World) -> None:
    from controller.backends.rank_exec import ENV_MEMORY_LIMIT

    ctl = world.controller()
    job = spec("limited")
    job["resources"]["memory"] = "6Gi"
    name = world.submit(job)
    start(world, ctl, name)
    assert world.backend.launches_of(name)[0].env[ENV_MEMORY_LIMIT] == str(6 << 30)  # 1 rank per node


def test_a_launch_that_raises_is_a_counted_failure_and_retried(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("nolaunch"))
    world.backend.launch_errors[name] = OSError("no free port")
    ctl.reconcile_once()
    job = world.job(name)
    assert (job.phase, job.num_restarts_counted) == (Phase.RESTARTING, 1)
    assert world.event(name, "Unknown").message == "launch failed: OSError: no free port"
    wait_backoff(world, ctl, name)
    assert world.job(name).phase is Phase.LAUNCHING and len(world.backend.gangs) == 1


def test_a_launch_slower_than_the_lease_still_records_its_outcome(world: World) -> None:
    """A pass that spends longer than the claim's lease in a launch (a slow or failing API server; seen under load
    in the operator's tests) renews the lapsed claim before it writes, as nobody took the job meanwhile."""
    ctl = world.controller()
    name = world.submit(spec("slowlaunch"))
    launch = world.backend.launch

    def slow_failing_launch(**kwargs):
        world.clock.advance(ctl.config.lease_seconds + 5)
        world.backend.launch = launch
        raise OSError("API server unavailable")

    world.backend.launch = slow_failing_launch  # type: ignore[method-assign]
    ctl.reconcile_once()
    job = world.job(name)
    assert (job.phase, job.num_restarts_counted) == (Phase.RESTARTING, 1)
    assert world.event(name, "Unknown").message == "launch failed: OSError: API server unavailable"

    def slow_launch(**kwargs):
        world.clock.advance(ctl.config.lease_seconds + 5)
        return launch(**kwargs)

    world.backend.launch = slow_launch  # type: ignore[method-assign]
    wait_backoff(world, ctl, name)
    assert world.job(name).phase is Phase.LAUNCHING
    assert world.attempts(name)[-1].backend_record is not None


def test_a_job_taken_over_during_a_slow_launch_gets_nothing_written_and_its_gang_is_stopped(
    world: World,
) -> None:
    """If another controller takes the job while this one's launch outlives the lease, the launched gang must not
    run beside the new owner's, and nothing of it is written on the job."""
    ctl = world.controller()
    name = world.submit(spec("stolen"))
    launch = world.backend.launch
    other = world.controller("ctl-b")

    def slow_launch_while_taken(**kwargs):
        world.clock.advance(ctl.config.lease_seconds + 5)
        gang = launch(**kwargs)
        other.reconcile_once()  # its pass takes the lapsed claim over
        return gang

    world.backend.launch = slow_launch_while_taken  # type: ignore[method-assign]
    ctl.reconcile_once()
    world.backend.launch = launch  # type: ignore[method-assign]
    job = world.job(name)
    assert job.claimed_by == "ctl-b"
    assert world.backend.gang(name, 1).cancels == [ctl.config.cancel_grace_seconds]
    first = world.attempts(name)[0]
    assert (first.number, first.backend_record) == (1, None)
    assert world.reasons(name)[-2:] == ["LeaseTakenOver", "LaunchInterrupted"]


def test_a_job_resumed_at_its_last_step_succeeds_without_taking_a_step(world: World) -> None:
    """The trainer saves at the last step; a crash after that save resumes there and exits 0 at once."""
    ctl = world.controller()
    name = world.submit(spec("done", steps=8, interval=4))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 7)  # step 8 of 8, saved
    crash(world, ctl, gang)  # e.g. in the exit barrier
    wait_backoff(world, ctl, name)
    last = world.backend.gang(name, 2)
    assert last.step == 8
    world.clock.advance(3)
    last.succeed()
    ctl.reconcile_once()

    job = world.job(name)
    assert job.phase is Phase.SUCCEEDED, job.phase_message
    assert world.reasons(name)[-2:] == ["RanksStarted", "Completed"]
    assert world.attempts(name)[1].exit_class == "Succeeded"


# ------------------------------------------------------------------------------------------ hangs


def test_a_gang_saving_and_exiting_after_its_last_step_is_not_hung(world: World) -> None:
    """Seen under load with an 8 s hang timeout: 6 s after the last step the ranks were still committing the final
    checkpoint and tearing down, and the controller called them hung and relaunched them. Past the last step the
    start-up limit applies (here 120 s; the hang timeout is 60 s), from the last step."""
    ctl = world.controller()
    name = world.submit(spec("finishing", steps=8))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 7)  # steps 0..7: the job's last step is done
    world.clock.advance(100)  # past the hang timeout, saving and exiting
    ctl.reconcile_once()
    assert world.job(name).phase is Phase.RUNNING and gang.cancels == []
    world.clock.advance(21)
    ctl.reconcile_once()
    assert world.event(name, "Hang").message.startswith("the gang has not exited 121 s after the last step")


def test_no_progress_for_the_hang_timeout_dumps_stacks_and_restarts(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("hang"))
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 3)
    last_progress = world.clock()
    world.clock.advance(60)
    ctl.reconcile_once()
    assert world.job(name).phase is Phase.RUNNING  # exactly the timeout: not yet
    world.clock.advance(1.5)
    ctl.reconcile_once()

    assert gang.stack_dumps == 1 and gang.cancels == [GRACE]
    dumped = world.event(name, "StacksDumped")
    assert dumped.type == EventType.FAILURE and dumped.data == {"ranks": [0, 1], "first_stalled": [0, 1]}
    assert dumped.message.startswith("no rank made progress for 62 s (limit 60 s)")
    # The hang's failure is its last progress: the 60 s waited out trained nothing, so the ledger books them,
    # with the pass's 1.5 s, as detection, not as running time.
    hang = world.event(name, "Hang")
    assert hang.data is not None and hang.data["detection_seconds"] == pytest.approx(61.5)
    assert hang.data["step"] == 4
    reasons = world.reasons(name)
    assert reasons.index("StacksDumped") < reasons.index("Hang") < reasons.index("RestartScheduled")
    [attempt] = world.attempts(name)
    assert attempt.failed_at is not None and attempt.failed_at.timestamp() == last_progress
    assert attempt.detected_at is not None and attempt.detected_at.timestamp() == last_progress + 61.5
    job = world.job(name)
    assert (job.phase, job.num_restarts_counted) == (Phase.RESTARTING, 1)
    assert job.lost_seconds["detection"] == pytest.approx(61.5)
    wait_backoff(world, ctl, name)
    assert world.job(name).current_attempt == 2


def test_a_gang_that_never_steps_within_the_startup_timeout_is_hung(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("stuck"))
    ctl.reconcile_once()
    world.clock.advance(121)
    ctl.reconcile_once()
    hang = world.event(name, "Hang")
    assert hang.message.startswith("no rank finished a step within 121 s of start-up (limit 120 s)")
    assert world.job(name).phase is Phase.RESTARTING


# ------------------------------------------------------------------------------------------ stragglers

SLOW_RANK = 2  # on node-1 with rank 3 (2 nodes x 2 ranks): half a node, so the rank is flagged, not the node


def straggler_job(world: World, ctl: Controller, name: str, **kw: Any) -> FakeGang:
    """A 4-rank job whose rank 2 does 2.5x the others' own work, stepped until two windows flag it."""
    gang = start(world, ctl, name, startup=2.0)
    steps(world, ctl, gang, 10, step_seconds=2.0, own_work={0: 0.8, 1: 0.8, SLOW_RANK: 2.0, 3: 0.8})
    return gang


def test_report_action_writes_one_straggler_event_and_keeps_the_gang(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("report", nodes=2, procs=2, steps=1000, stragglers={"action": "report"}))
    gang = straggler_job(world, ctl, name)

    flagged = world.event(name, "StragglerFlagged")
    assert flagged.type == EventType.STRAGGLER and flagged.data is not None
    expected = {"rank": SLOW_RANK, "node": "node-1", "step": 9, "windows": 2, "node_wide": False}
    assert pick(flagged.data, expected) == expected
    assert flagged.data["slowdown"] == pytest.approx(2.5)
    assert "NodeSlow" not in world.reasons(name) and "ExcludeNodeDecision" not in world.reasons(name)
    rows = {r.rank: r for r in world.rows(RankStatus, name)}
    assert [r for r, row in rows.items() if row.flagged] == [SLOW_RANK]
    assert rows[SLOW_RANK].straggler_score is not None and rows[SLOW_RANK].straggler_score > 5
    assert gang.cancels == [] and world.job(name).phase is Phase.RUNNING

    steps(world, ctl, gang, 5, step_seconds=2.0, own_work={SLOW_RANK: 2.0})  # still slow: no second event
    assert world.reasons(name).count("StragglerFlagged") == 1


@on_each_store
def test_exclude_node_restarts_on_the_spare_when_it_pays(world: World) -> None:
    ctl = world.controller()
    name = world.submit(
        spec("exclude", nodes=2, procs=2, spares=1, steps=1000, stragglers={"action": "exclude-node"})
    )
    gang = straggler_job(world, ctl, name)
    decision = world.event(name, "ExcludeNodeDecision")
    assert decision.type == EventType.DECISION and decision.attempt == 1 and decision.data is not None
    # 989 steps left at 0.8 s healthy, 2.5x slower: staying costs 989 x 0.8 x 1.5 s more than leaving;
    # a restart costs half the cancel grace plus the measured launch-to-first-step time (2 s).
    expected = {
        "node": "node-1",
        "exclude": True,
        "remaining_steps": 989.0,
        "throughput_after": 1.0,
        "steps_since_checkpoint": 0.0,
        "launch_seconds": 2.0,
        "teardown_seconds": GRACE / 2,
    }
    assert pick(decision.data, expected) == expected
    assert decision.data["slowdown_fraction"] == pytest.approx(1.5)
    assert decision.data["step_seconds"] == pytest.approx(0.8)
    assert decision.data["saved_seconds"] == pytest.approx(989 * 0.8 * 1.5)
    assert decision.data["cost_seconds"] == pytest.approx(GRACE / 2 + 2.0)
    assert decision.message.startswith("excluding node node-1: 150% slower over 989 remaining steps")

    assert gang.cancels == [GRACE]
    [health] = world.rows(NodeHealth, name)
    assert (health.node, health.excluded, health.reason) == ("node-1", True, "Straggler")
    reasons = world.reasons(name)
    assert (
        reasons.index("StragglerFlagged")
        < reasons.index("ExcludeNodeDecision")
        < reasons.index("NodeExcluded")
    )
    stopped = world.event(name, "StragglerExcluded")
    assert stopped.data is not None and stopped.data["counts_toward_limit"] is False
    job = world.job(name)
    assert (job.phase, job.num_restarts, job.num_restarts_counted) == (Phase.RESTARTING, 1, 0)

    wait_backoff(world, ctl, name)
    second = world.backend.launches_of(name)[1]
    assert second.nodes == ["node-0", "node-2"] and second.excluded == ["node-1"]
    assert world.attempts(name)[1].nodes == ["node-0", "node-2"]


def test_exclude_node_saves_at_the_current_step_on_the_graceful_stop(world: World) -> None:
    ctl = world.controller()
    name = world.submit(
        spec(
            "graceful",
            nodes=2,
            procs=2,
            spares=1,
            steps=1000,
            interval=100,
            stragglers={"action": "exclude-node"},
        )
    )
    gang = start(world, ctl, name, startup=2.0)
    gang.save_on_sigterm = True
    steps(world, ctl, gang, 10, step_seconds=2.0, own_work={SLOW_RANK: 2.0})
    assert gang.cancels == [GRACE]
    wait_backoff(world, ctl, name)
    assert world.backend.launches_of(name)[1].config["checkpoint"]["resume_step"] == 11


@on_each_store
def test_exclude_node_keeps_the_node_when_the_restart_costs_more(world: World) -> None:
    ctl = world.controller()
    name = world.submit(
        spec(
            "keep", nodes=2, procs=2, spares=1, steps=14, interval=100, stragglers={"action": "exclude-node"}
        )
    )
    gang = straggler_job(world, ctl, name)  # 3 steps left: 3 x 0.8 x 1.5 = 3.6 s < 9.5 s
    decision = world.event(name, "ExcludeNodeDecision")
    assert decision.data is not None and decision.data["exclude"] is False
    assert decision.message.startswith("keeping node node-1")
    assert gang.cancels == [] and world.rows(NodeHealth, name) == []
    assert world.job(name).phase is Phase.RUNNING


@on_each_store
def test_exclude_node_keeps_the_node_when_no_spare_could_replace_it(world: World) -> None:
    """Without a spare the next attempt could not be placed (the gang never shrinks): excluding would fail
    the job with NotEnoughNodes instead of speeding it up."""
    ctl = world.controller()
    name = world.submit(spec("nospare", nodes=2, procs=2, steps=1000, stragglers={"action": "exclude-node"}))
    gang = straggler_job(world, ctl, name)
    decision = world.event(name, "ExcludeNodeDecision")
    assert decision.data is not None and decision.data["exclude"] is False, decision.message
    assert (
        decision.message
        == "keeping node node-1: without it the next attempt would have too few nodes (no spare left)"
    )
    assert decision.data["saved_seconds"] > decision.data["cost_seconds"]  # it would have paid, with a spare
    assert gang.cancels == [] and world.rows(NodeHealth, name) == []
    assert world.job(name).phase is Phase.RUNNING


@on_each_store
def test_exclude_node_with_dp1_and_no_spare_keeps_the_node_in_one_decision(world: World) -> None:
    """Issue 12: with dp=1 and no spare the throughput after an exclusion would be 0, and the decision raised
    ValueError on every pass instead of keeping the node."""
    ctl = world.controller()
    job = spec("dp1", nodes=2, procs=2, steps=1000, stragglers={"action": "exclude-node"})
    job["training"]["parallel"] = {"dp": 1, "tp": 2, "pp": 2}
    name = world.submit(job)
    gang = straggler_job(world, ctl, name)
    steps(world, ctl, gang, 10, step_seconds=2.0, own_work={0: 0.8, 1: 0.8, SLOW_RANK: 2.0, 3: 0.8})
    decisions = [e for e in world.events(name) if e.reason == "ExcludeNodeDecision"]
    assert len(decisions) == 1 and decisions[0].data is not None and decisions[0].data["exclude"] is False
    assert decisions[0].message == (
        "keeping node node-1: no spare node and data parallelism cannot shrink (dp=1)"
    )
    assert gang.cancels == [] and world.job(name).phase is Phase.RUNNING


# ------------------------------------------------------------------------------------------ checkpoint interval


def test_auto_checkpoint_interval_uses_the_measured_save_and_step_times(world: World) -> None:
    ctl = world.controller()
    t0 = world.clock()
    name = world.submit(spec("auto", steps=1000, interval="auto"))
    gang = start(world, ctl, name)  # first step at t0 + 5
    assert world.backend.launches_of(name)[0].config["checkpoint"]["interval_steps"] == 4  # nothing measured
    assert "CheckpointInterval" not in world.reasons(name)
    world.clock.advance(18)
    gang.run_steps(9, step_seconds=2.0, save_seconds=0.6)  # step 10 at t0 + 23; saves at 4 and 8
    ctl.reconcile_once()
    gang.crash(0)
    ctl.reconcile_once()  # detected at t0 + 23
    wait_backoff(world, ctl, name)

    # 9 steps in the 18 s after the first one, 1 failure in 23 s observed, saves blocking 0.6 s.
    interval = auto_checkpoint_interval(
        save_seconds=0.6,
        median_step_seconds=2.0,
        num_failures=1,
        observed_seconds=23.0,
        policy=CheckpointIntervalPolicy(min_interval_steps=1, max_interval_steps=5000),
    )
    first_step_at = world.attempts(name)[0].first_step_at
    assert first_step_at is not None and first_step_at.timestamp() == t0 + 5
    decision = world.event(name, "CheckpointInterval")
    assert decision.type == EventType.DECISION and decision.data is not None
    expected = {
        "steps": interval.steps,
        "save_seconds": 0.6,
        "step_seconds": 2.0,
        "failures": 1,
        "observed_seconds": 23.0,
    }
    assert pick(decision.data, expected) == expected
    assert world.backend.launches_of(name)[1].config["checkpoint"]["interval_steps"] == interval.steps
    assert interval.steps == 114  # sqrt(2 x 0.6 x (23 + 86400) / 2) / 2.0 = 113.9


# ------------------------------------------------------------------------------------------ resume


def failed_with_checkpoints(world: World, ctl: Controller, name: str) -> FakeGang:
    gang = start(world, ctl, name)
    steps(world, ctl, gang, 9)  # checkpoints at 4 and 8
    crash(world, ctl, gang, code=2)
    assert world.job(name).phase is Phase.FAILED
    return gang


@on_each_store
def test_reopen_from_a_step_relaunches_from_exactly_that_checkpoint(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("reopen", max_restarts=0))
    failed_with_checkpoints(world, ctl, name)
    world.clock.advance(100)
    world.transition(name, states.reopen, from_step=4)
    ctl.reconcile_once()

    job = world.job(name)
    assert (job.phase, job.current_attempt, job.resume_from_step) == (Phase.LAUNCHING, 2, None)
    assert world.backend.launches_of(name)[1].config["checkpoint"]["resume_step"] == 4  # not the newer 8
    assert world.attempts(name)[1].resumed_from_step == 4
    assert world.reasons(name)[-2:] == ["ResumeRequested", "Launched"]
    # The restart budget starts over too: one counted failure, and max_restarts=0 is exceeded again.
    crash(world, ctl, world.backend.gang(name, 2), code=1)
    assert world.job(name).phase_reason == "ReachedMaxRestarts"


@pytest.mark.parametrize(
    ("step", "corrupt", "message"),
    [
        (6, False, "from_step: no committed checkpoint at step 6 (committed: 4, 8)"),
        (8, True, "from_step: the checkpoint at step 8 is corrupt: "),
    ],
)
def test_reopen_from_a_missing_or_corrupt_step_fails_with_one_line(
    world: World, step: int, corrupt: bool, message: str
) -> None:
    ctl = world.controller()
    name = world.submit(spec("badstep"))
    gang = failed_with_checkpoints(world, ctl, name)
    if corrupt:
        corrupt_checkpoint(gang.checkpoint_root, 8)
    world.transition(name, states.reopen, from_step=step)
    ctl.reconcile_once()

    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.FAILED, "LaunchFailed")
    assert job.phase_message.startswith(message) and "\n" not in job.phase_message
    assert len(world.backend.launches_of(name)) == 1 and job.finished_at == world.now_dt()


# ------------------------------------------------------------------------------------------ nodes


def test_not_enough_nodes_when_exclusions_leave_too_few(world: World) -> None:
    ctl = world.controller()
    short = world.submit(spec("short"))
    spare = world.submit(spec("spare", spares=1))
    with world.store.transaction() as session:
        for name in (short, spare):
            job = session.scalars(select(Job).where(Job.name == name)).one()
            exclude_node(session=session, node="node-1", reason="Manual", job=job)
    ctl.reconcile_once()

    job = world.job(short)
    assert (job.phase, job.phase_reason) == (Phase.FAILED, "NotEnoughNodes")
    assert job.phase_message == "needs 2 node(s) of 2, but node-1 are excluded"
    assert job.finished_at == world.now_dt() and world.backend.launches_of(short) == []
    [launch] = world.backend.launches_of(spare)
    assert launch.nodes == ["node-0", "node-2"] and launch.excluded == ["node-1"]


# ------------------------------------------------------------------------------------------ controllers


def test_an_interrupted_launch_is_reaped_and_relaunched_without_counting(world: World) -> None:
    name = world.submit(spec("interrupted", max_restarts=1))
    world.backend.die_after_launch.add(name)
    with pytest.raises(ControllerDied):
        world.controller().reconcile_once()
    [attempt] = world.attempts(name)
    assert attempt.backend_record is None and world.job(name).phase is Phase.LAUNCHING
    orphan = world.backend.gang(name, 1)
    assert not orphan.ended

    ctl = world.controller()  # the same host restarted: the claim is still its own
    ctl.reconcile_once()
    # Reaped once: 2 nodes x (agent + 1 worker); the reap before the first launch found nothing.
    assert orphan.ended and world.backend.reaps == [(name, 0), (name, 4)]
    job = world.job(name)
    assert (job.phase, job.phase_reason) == (Phase.RESTARTING, "LaunchInterrupted")
    assert (job.num_restarts, job.num_restarts_counted) == (1, 0)
    assert world.attempts(name)[0].exit_class == "LaunchInterrupted"
    assert not [e for e in world.events(name) if e.type == EventType.FAILURE]
    ctl.reconcile_once()  # no backoff for an interruption
    assert world.job(name).current_attempt == 2 and len(world.backend.launches_of(name)) == 2

    gang = world.backend.gang(name, 2)
    crash(world, ctl, gang)  # the first counted failure: within max_restarts=1
    assert world.job(name).phase is Phase.RESTARTING


def test_a_restarted_controller_reattaches_and_does_not_launch_again(world: World) -> None:
    name = world.submit(spec("reattach", steps=8))
    first = world.controller()
    gang = start(world, first, name)
    steps(world, first, gang, 2)
    del first  # killed: no shutdown, the gang runs on

    again = world.controller()
    world.clock.advance(1)
    again.reconcile_once()
    assert world.backend.attached == [gang.record()] and gang.attaches == 1
    assert len(world.backend.launches) == 1
    assert world.backend.telemetry_calls[-1].reattach is True
    assert world.job(name).phase is Phase.RUNNING

    steps(world, again, gang, 5)  # to the end, watched by the new controller
    gang.succeed()
    again.reconcile_once()
    job = world.job(name)
    assert (job.phase, job.current_step) == (Phase.SUCCEEDED, 8)
    assert len(world.backend.launches) == 1 and gang.cancels == []


def test_another_controller_takes_over_only_after_the_lease_expires(world: World) -> None:
    name = world.submit(spec("takeover", steps=100))
    owner = world.controller("ctl-a", lease_seconds=30)
    gang = start(world, owner, name)
    other = world.controller("ctl-b", lease_seconds=30)
    other.reconcile_once()
    world.clock.advance(29)
    other.reconcile_once()
    assert world.backend.attached == [] and world.job(name).claimed_by == "ctl-a"

    world.clock.advance(2)  # the owner stopped renewing 31 s ago
    other.reconcile_once()
    job = world.job(name)
    assert job.claimed_by == "ctl-b" and job.phase is Phase.RUNNING
    taken = world.event(name, "LeaseTakenOver")
    assert taken.data == {"from": "ctl-a", "to": "ctl-b"}
    assert world.backend.attached == [gang.record()] and len(world.backend.launches) == 1

    owner.reconcile_once()  # back from a pause: the job is no longer its own, and it leaves the gang alone
    assert gang.detaches == 1 and gang.cancels == [] and not gang.ended
    assert world.job(name).claimed_by == "ctl-b"


@pytest.mark.parametrize("max_jobs", [3, 64])  # 3: each controller must take half; 64: either may take all
def test_two_controllers_on_postgresql_launch_each_pending_job_once(
    postgres_only_url: str, tmp_path: Path, max_jobs: int
) -> None:
    store = open_store(StoreConfig(url=postgres_only_url))
    try:
        upgrade(store)
        clock = FakeClock()
        backend = FakeBackend(clock)
        names = [f"race-{i}" for i in range(6)]
        with store.transaction() as session:
            for name in names:
                create_job(
                    session=session, name=name, spec=spec(name), now=datetime.fromtimestamp(clock(), UTC)
                )
        controllers = [
            Controller(
                store,
                backends={"local": backend},
                config=ControllerConfig(
                    controller_id=f"ctl-{i}", runs_root=tmp_path / "runs", max_jobs=max_jobs
                ),
                clock=clock,
                draw=lambda: DRAW,
            )
            for i in range(2)
        ]
        barrier = threading.Barrier(len(controllers))
        errors: list[BaseException] = []

        def run(ctl: Controller) -> None:
            try:
                barrier.wait(timeout=10)
                for _ in range(4):
                    ctl.reconcile_once()
            except BaseException as err:  # reported below, with the thread's exception
                errors.append(err)

        threads = [threading.Thread(target=run, args=(c,)) for c in controllers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert sorted(launch.job_name for launch in backend.launches) == names  # each once
        with store.read() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.name)))
            assert all(j.phase is Phase.LAUNCHING and j.current_attempt == 1 for j in jobs)
            owners = sorted(j.claimed_by or "" for j in jobs)
        assert set(owners) <= {"ctl-0", "ctl-1"} and len(owners) == 6
        if max_jobs == 3:
            assert owners == ["ctl-0"] * 3 + ["ctl-1"] * 3
    finally:
        store.dispose()


def test_a_cancelled_job_is_stopped_by_its_controller_on_the_next_pass(world: World) -> None:
    ctl = world.controller()
    name = world.submit(spec("cancel"))
    gang = start(world, ctl, name)
    world.transition(name, states.cancel, message="not needed")
    assert gang.cancels == []
    ctl.reconcile_once()
    assert gang.cancels == [GRACE] and gang.ended
    ctl.reconcile_once()
    assert gang.cancels == [GRACE]
    job = world.job(name)
    assert (job.phase, job.phase_message) == (Phase.CANCELLED, "not needed")
    assert world.attempts(name)[0].exit_class == "Cancelled"


def test_one_jobs_error_does_not_stop_the_pass_for_the_others(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = world.controller()
    broken = world.submit(spec("broken"))
    fine = world.submit(spec("fine"))
    launch = ctl._launch

    def failing_launch(job_id, job_spec):
        if job_spec.name == "broken":
            raise RuntimeError("the broken job's launch blew up")
        return launch(job_id, job_spec)

    monkeypatch.setattr(ctl, "_launch", failing_launch)
    ctl.reconcile_once()
    assert world.job(broken).phase is Phase.PENDING
    assert world.job(fine).phase is Phase.LAUNCHING
    assert "reconcile failed; retrying on the next pass" in caplog.text
    assert "the broken job's launch blew up" in caplog.text
    ctl.reconcile_once()  # retried, still failing, still harmless
    assert world.job(broken).phase is Phase.PENDING and len(world.backend.launches) == 1


def test_a_controller_claims_only_jobs_of_its_backends(world: World) -> None:
    ctl = world.controller()
    other = world.submit(spec("on-a-cluster", backend="kubernetes"))  # an operator's job in a shared store
    ctl.reconcile_once()
    job = world.job(other)
    assert job.phase is Phase.PENDING and job.claimed_by is None and world.backend.launches == []


def test_shutdown_detaches_and_releases_so_another_controller_takes_over_at_once(world: World) -> None:
    name = world.submit(spec("handover"))
    first = world.controller("ctl-a")
    gang = start(world, first, name)
    first.shutdown()
    assert gang.detaches == 1 and gang.cancels == [] and world.job(name).claimed_by is None

    second = world.controller("ctl-b")
    second.reconcile_once()  # no lease to wait out
    assert world.job(name).claimed_by == "ctl-b" and world.backend.attached == [gang.record()]
    assert "LeaseTakenOver" not in world.reasons(name) and len(world.backend.launches) == 1
    second.shutdown(stop_jobs=True)
    assert gang.cancels == [GRACE] and gang.ended


def test_a_spec_without_a_backend_key_is_a_local_job(world: World) -> None:
    ctl = world.controller()
    raw = spec("no-backend-key")
    raw.pop("backend", None)
    name = world.submit(raw)
    ctl.reconcile_once()
    assert world.job(name).phase is Phase.LAUNCHING
