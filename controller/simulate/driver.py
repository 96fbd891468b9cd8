"""One simulated run: a fresh store, the job submitted, the real `Controller` over the simulated backend, and the
event loop that moves the injected clock from one event to the next.

    loop: apply the failures up to now -> write the checkpoint folder as it stands -> controller.reconcile_once()
          -> next time = the earliest of: the next failure, a node's failure becoming visible, a first step, an
             in-place round's join/resume, a spare ready, a hang's deadline, the backoff's end (the job's
             next_attempt_at), a heartbeat, the horizon

Decisions:

- The controller decides everything it decides in production (classification, restart or fail, backoff with
  its random draw, the checkpoint interval, in-place replacement, hang verdicts); the loop only chooses when it
  runs, and runs it at every moment its answer could change.
- A job the controller fails (a crash-loop verdict, the restart budget) is resumed the way a person would
  (`vlctl resume`, states.reopen) after `operator_delay_s`, and the run counts it: a 54-day job is not given up.
- ETTR is reported twice: the controller's own ledger (what `vlctl status` shows) and the truth the world knows
  (steps trained once x the healthy step time / wall time). Where they differ, the ledger misses something.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from controller import states
from controller.domain.phases import TERMINAL_PHASES, EventType, Phase
from controller.history import update_goodput
from controller.reconciler import Controller, ControllerConfig
from controller.simulate.backend import SimBackend
from controller.simulate.spec import SimSpec
from controller.simulate.world import World
from controller.spec import TrainingJobSpec
from controller.store.migrate import upgrade
from controller.store.models import Event, Job
from controller.store.repo import create_job
from controller.store.session import StoreConfig, open_store

# Modules whose writes default to the wall clock (`now or utcnow()`) where the reconciler passes no time.
WALL_CLOCK_DEFAULTS = ("controller.states", "controller.store.repo", "controller.store.records")
START = 1_700_000_000.0  # simulated unix seconds at submission
OPERATOR_DELAY_S = 1800.0  # a person resumes a job the controller failed


@dataclass(kw_only=True)
class RunResult:
    seed: int
    gpus: int
    recovery: str
    interval: str
    wall_seconds: float
    ettr_ledger: float
    ettr_true: float
    lost_seconds: dict[str, float]
    failures: dict[str, int]
    seen_as: dict[str, int]
    idle_failures: int
    during_startup: int
    decisions: dict[str, int]
    intervals_chosen: list[int]
    reopened: int
    passes: int
    run_seconds: float
    store_url: str
    extra: dict[str, Any] = field(default_factory=dict)


def run_once(spec: SimSpec, *, seed: int, workdir: Path, days: float | None = None) -> RunResult:
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    model = spec.load_model()
    costs = spec.costs()
    run_dir = workdir / "run"
    raw = spec.training_job(run_dir)
    job_spec = TrainingJobSpec.model_validate(raw)
    url = f"sqlite:///{workdir / 'vlctl.db'}"
    store = open_store(StoreConfig(url=url))
    upgrade(store)
    world = World(
        spec=spec,
        model=model,
        costs=costs,
        hang=job_spec.hang_config(),
        seed=seed,
        start=START,
        checkpoint_root=run_dir / job_spec.training.checkpoint.dir,
    )
    clock = world.clock
    stack = contextlib.ExitStack()
    horizon = START + (days if days is not None else spec.job.days) * 86_400.0
    try:
        stack.enter_context(simulated_utcnow(clock))
        with store.transaction() as session:
            job_id = create_job(session=session, name=spec.job.name, spec=raw, now=_dt(START)).id
        controller = Controller(
            store,
            backends={"local": SimBackend(world)},
            config=ControllerConfig(
                controller_id="simulator",
                lease_seconds=365 * 86_400.0,  # one controller, passes hours apart: its lease never lapses
                runs_root=workdir / "runs",
            ),
            clock=clock,
            draw=random.Random(seed + 1).random,  # the backoff's jitter
        )
        passes = reopened = 0
        heartbeat = spec.simulation.heartbeat_seconds
        while True:
            now = clock()
            world.advance(now)
            world.materialize(now)
            controller.reconcile_once()
            passes += 1
            after = clock()  # a teardown moved it
            world.advance(after)
            with store.read() as session:
                job = session.get(Job, job_id)
                assert job is not None
                phase, next_at = job.phase, job.next_attempt_at
            if after >= horizon:
                break
            if phase in TERMINAL_PHASES:
                clock.now = min(horizon, after + OPERATOR_DELAY_S)
                with store.transaction() as session:
                    job = session.get(Job, job_id)
                    assert job is not None
                    states.reopen(job, session=session, message="resumed by the simulated operator",
                                  now=_dt(clock.now))  # fmt: skip
                reopened += 1
                continue
            t = min(world.next_event(after), after + heartbeat, horizon)
            if phase is Phase.PENDING:
                t = after
            elif phase is Phase.RESTARTING:
                t = min(t, max(after, next_at.timestamp() if next_at else after))
            clock.now = max(t, after)
        with store.transaction() as session:
            job = session.get(Job, job_id)
            assert job is not None
            update_goodput(session=session, job=job, now=horizon)
            ledger = job.ettr or 0.0
            lost = {k: float(v) for k, v in (job.lost_seconds or {}).items()}
            decisions = _decisions(session, job_id)
            intervals = _intervals(session, job_id)
        wall = horizon - START
        world.materialize(horizon)
        return RunResult(
            seed=seed,
            gpus=spec.gpus,
            recovery=spec.policy.recovery,
            interval=str(spec.policy.checkpoint_interval),
            wall_seconds=wall,
            ettr_ledger=ledger,
            ettr_true=world.trained_seconds() / wall,
            lost_seconds=lost,
            failures=dict(world.stats.failures),
            seen_as=dict(world.stats.seen_as),
            idle_failures=world.stats.idle_failures,
            during_startup=world.stats.during_startup,
            decisions=decisions,
            intervals_chosen=intervals,
            reopened=reopened,
            passes=passes,
            run_seconds=time.perf_counter() - started,
            store_url=url,
            extra={"costs": {k: getattr(costs, k) for k in costs.__dataclass_fields__}},
        )
    finally:
        stack.close()
        world.close()
        store.dispose()


@contextlib.contextmanager
def simulated_utcnow(clock: Callable[[], float]) -> Iterator[None]:
    """Events the reconciler writes without a time (Recovery, Decision, checkpoint records) take the store's
    `utcnow()`, the wall clock: for the run, that default reads the simulated clock, so the timeline is in
    simulated time throughout. (The reconciler should pass `now=` itself: docs/scale.md.)"""
    saved = []
    for name in WALL_CLOCK_DEFAULTS:
        module = importlib.import_module(name)
        saved.append((module, module.utcnow))
        module.utcnow = lambda: _dt(clock())  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in saved:
            module.utcnow = original  # type: ignore[attr-defined]


def _decisions(session: Any, job_id: int) -> dict[str, int]:
    """What the controller decided, by event reason: restarts, failures by class, in-place recoveries, ..."""
    counts: dict[str, int] = {}
    rows = session.execute(
        select(Event.type, Event.reason).where(
            Event.job_id == job_id,
            Event.type.in_(
                [EventType.FAILURE, EventType.RECOVERY, EventType.DECISION, EventType.PHASE_CHANGED]
            ),
        )
    )
    for type_, reason in rows:
        key = f"{type_}/{reason}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _intervals(session: Any, job_id: int) -> list[int]:
    rows = session.scalars(
        select(Event.data)
        .where(Event.job_id == job_id, Event.reason == "CheckpointInterval")
        .order_by(Event.seq)
    )
    return [int(d["steps"]) for d in rows if d and "steps" in d]


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)
