"""The job state machine: guards, one event per transition in order, atomicity, and no phase writes elsewhere."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller import states
from controller.domain.phases import TERMINAL_PHASES, EventType, Phase
from controller.store import (
    Attempt,
    ClaimNotHeld,
    Job,
    Store,
    StoreConfig,
    claims,
    create_job,
    get_job,
    list_events,
    open_store,
    records,
    repo,
)
from controller.store.claims import claim_jobs
from controller.store.repo import append_event

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTROLLER = "ctl-a"


def _claim(session: Session) -> None:
    claim_jobs(session=session, controller_id=CONTROLLER, lease_seconds=60, limit=1_000)


# How to take a job from the phase before it into each phase, with the arguments the step needs.
STEPS: dict[Phase, Callable[[Job, Session], object]] = {
    Phase.LAUNCHING: lambda job, s: states.launch(
        job, session=s, controller_id=CONTROLLER, nodes=["local-0"]
    ),
    Phase.RUNNING: lambda job, s: states.mark_running(job, session=s),
    Phase.RESTARTING: lambda job, s: states.restart(
        job, session=s, exit_class="RankExited", detail="rank 1 exit 1"
    ),
    Phase.SUCCEEDED: lambda job, s: states.succeed(job, session=s),
    Phase.FAILED: lambda job, s: states.fail(job, session=s, message="gave up"),
    Phase.CANCELLED: lambda job, s: states.cancel(job, session=s),
}
PATHS: dict[Phase, list[Phase]] = {
    Phase.PENDING: [],
    Phase.LAUNCHING: [Phase.LAUNCHING],
    Phase.RUNNING: [Phase.LAUNCHING, Phase.RUNNING],
    Phase.RESTARTING: [Phase.LAUNCHING, Phase.RUNNING, Phase.RESTARTING],
    Phase.SUCCEEDED: [Phase.LAUNCHING, Phase.RUNNING, Phase.SUCCEEDED],
    Phase.FAILED: [Phase.LAUNCHING, Phase.FAILED],
    Phase.CANCELLED: [Phase.CANCELLED],
}


def _job_in(session: Session, phase: Phase, name: str) -> Job:
    job = create_job(session=session, name=name, spec={})
    _claim(session)
    for step in PATHS[phase]:
        STEPS[step](job, session)
    assert job.phase == phase
    return job


def test_every_transition_is_guarded_and_terminal_phases_are_final(migrated_store: Store) -> None:
    for current in Phase:
        for target in STEPS:
            name = f"{current}-to-{target}"
            allowed = current in states.ALLOWED_FROM[target]
            assert allowed == (current not in TERMINAL_PHASES and states.can_transition(current, target))
            with migrated_store.transaction() as session:
                job = _job_in(session, current, name)
                seq_before = job.event_seq
                if allowed:
                    STEPS[target](job, session)
                    assert (job.phase, job.event_seq) == (target, seq_before + 1)
                else:
                    with pytest.raises(
                        states.InvalidTransition, match=f"cannot go from {current} to {target}"
                    ):
                        STEPS[target](job, session)
                    assert (job.phase, job.event_seq) == (current, seq_before)


def test_a_lifecycle_leaves_exactly_one_event_per_transition_in_order(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="life", spec={})
        _claim(session)
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0", "local-1"])
        states.mark_running(job, session=session)
        states.restart(job, session=session, exit_class="NodeLost", counts_toward_limit=False)
        states.launch(
            job,
            session=session,
            controller_id=CONTROLLER,
            nodes=["local-0"],
            resume_from_step=100,
            resume_from_uri="file:///c/step-100",
        )
        states.mark_running(job, session=session)
        states.restart(job, session=session, exit_class="RankExited", detail="exit 1")
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0"])
        states.mark_running(job, session=session)
        states.succeed(job, session=session)
    with migrated_store.read() as session:
        job = get_job(session=session, name="life")
        events = list_events(session=session, job_id=job.id)
        attempts = list(
            session.scalars(select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number))
        )

    assert [e.seq for e in events] == list(range(1, 11)) and job.event_seq == 10
    changes = [(e.data or {}).get("from") for e in events[1:]], [(e.data or {}).get("to") for e in events[1:]]
    assert all(e.type == EventType.PHASE_CHANGED for e in events[1:])
    path = [
        "pending",
        "launching",
        "running",
        "restarting",
        "launching",
        "running",
        "restarting",
        "launching",
        "running",
        "succeeded",
    ]
    assert changes == (path[:-1], path[1:])
    assert [e.reason for e in events] == [
        "Submitted",
        "Launched",
        "RanksStarted",
        "RestartScheduled",
        "Launched",
        "RanksStarted",
        "RestartScheduled",
        "Launched",
        "RanksStarted",
        "Completed",
    ]
    assert [e.attempt for e in events] == [None, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert (job.phase, job.current_attempt, job.num_restarts, job.num_restarts_counted) == (
        Phase.SUCCEEDED,
        3,
        2,
        1,
    )
    assert job.finished_at is not None and job.claimed_by is None
    assert [(a.number, a.exit_class, a.resumed_from_step) for a in attempts] == [
        (1, "NodeLost", None),
        (2, "RankExited", 100),
        (3, "Succeeded", None),
    ]
    assert all(a.ended_at is not None and a.running_at is not None for a in attempts)


def test_launch_requires_the_claim_and_controller_transitions_check_it_when_asked(
    migrated_store: Store,
) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="unclaimed", spec={})
        with pytest.raises(
            ClaimNotHeld,
            match="controller 'ctl-a' does not hold the claim on job 'unclaimed' \\(unclaimed\\)",
        ):
            states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0"])
        _claim(session)
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0"])
        with pytest.raises(ClaimNotHeld, match="held by 'ctl-a'"):
            states.mark_running(job, session=session, controller_id="ctl-b")
        states.mark_running(job, session=session, controller_id=CONTROLLER)
        nowhere = create_job(session=session, name="nowhere", spec={})
        _claim(session)
        with pytest.raises(ValueError, match="nodes: an attempt runs on at least one node"):
            states.launch(nowhere, session=session, controller_id=CONTROLLER, nodes=[])


def test_a_failing_transaction_leaves_no_partial_state(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="atomic", spec={})
        _claim(session)
    with pytest.raises(RuntimeError, match="boom"), migrated_store.transaction() as session:
        job = get_job(session=session, name="atomic")
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0"])
        session.flush()  # the rows reach the database, uncommitted
        raise RuntimeError("boom")
    _assert_untouched(migrated_store, "atomic")


CRASH_MID_TRANSACTION = """
import os, signal, sys
from controller import states
from controller.store import StoreConfig, get_job, open_store
store = open_store(StoreConfig(url=sys.argv[1]))
with store.transaction() as session:
    job = get_job(session=session, name="crash")
    states.launch(job, session=session, controller_id="ctl-a", nodes=["local-0"])
    session.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the controller dies before COMMIT
"""


@pytest.mark.multiproc
def test_a_controller_killed_mid_transaction_leaves_no_partial_state(
    migrated_store: Store, empty_db_url: str
) -> None:
    with migrated_store.transaction() as session:
        create_job(session=session, name="crash", spec={})
        _claim(session)
    child = subprocess.run(
        [sys.executable, "-c", CRASH_MID_TRANSACTION, empty_db_url],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert child.returncode == -9, child.stderr
    _assert_untouched(migrated_store, "crash")
    with migrated_store.transaction() as session:  # and nothing is left locked
        states.launch(
            get_job(session=session, name="crash"),
            session=session,
            controller_id=CONTROLLER,
            nodes=["local-0"],
        )


def _assert_untouched(store: Store, name: str) -> None:
    with store.read() as session:
        job = get_job(session=session, name=name)
        assert (job.phase, job.current_attempt, job.event_seq) == (Phase.PENDING, 0, 1)
        assert session.scalar(select(func.count()).select_from(Attempt).where(Attempt.job_id == job.id)) == 0
        assert [e.reason for e in list_events(session=session, job_id=job.id)] == ["Submitted"]


def test_concurrent_writers_never_lose_or_reorder_events(migrated_store: Store, empty_db_url: str) -> None:
    with migrated_store.transaction() as session:
        job_id = create_job(session=session, name="busy", spec={}).id
    num_threads, per_thread = 4, 15
    stores = [open_store(StoreConfig(url=empty_db_url)) for _ in range(num_threads)]

    def write(store: Store, writer: int) -> None:
        for i in range(per_thread):
            with store.transaction() as session:
                job = session.get_one(Job, job_id)
                append_event(
                    session=session,
                    job=job,
                    type=EventType.STRAGGLER,
                    reason="RankSlow",
                    data={"writer": writer, "i": i},
                )

    threads = [threading.Thread(target=write, args=(store, n)) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.dispose()
    with migrated_store.read() as session:
        events = list_events(session=session, job_id=job_id)
    assert [e.seq for e in events] == list(range(1, 2 + num_threads * per_thread))
    for writer in range(num_threads):  # each writer's events appear in the order it wrote them
        assert [e.data["i"] for e in events[1:] if e.data and e.data["writer"] == writer] == list(
            range(per_thread)
        )


def test_event_types_and_reasons_must_be_camel_case(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="shape", spec={})
        with pytest.raises(ValueError, match="event reason: 'rank slow' is not a CamelCase constant"):
            append_event(session=session, job=job, type=EventType.STRAGGLER, reason="rank slow")


def _phase_writes(path: Path) -> list[str]:
    """Assignments to `.phase`, `phase=` keywords to constructors and UPDATE values, and setattr(..., "phase")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        if any(isinstance(t, ast.Attribute) and t.attr == "phase" for t in targets):
            found.append(f"{path}:{node.lineno}: assigns .phase")
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee in ("Job", "values", "update", "insert") and any(
                k.arg == "phase" for k in node.keywords
            ):
                found.append(f"{path}:{node.lineno}: {callee}(phase=...)")
            if callee == "setattr" and len(node.args) > 1 and getattr(node.args[1], "value", None) == "phase":
                found.append(f"{path}:{node.lineno}: setattr(..., 'phase')")
    return found


def test_only_the_state_machine_writes_a_jobs_phase(tmp_path: Path) -> None:
    state_machine = REPO_ROOT / "controller" / "states.py"
    sources = [p for package in ("controller", "cli", "k8s") for p in (REPO_ROOT / package).rglob("*.py")]
    offenders = [hit for path in sources if path != state_machine for hit in _phase_writes(path)]
    assert offenders == []
    assert _phase_writes(state_machine), "the check finds nothing even where the phase is written"
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("job.phase = 'running'\nsession.execute(update(Job).values(phase='failed'))\n")
    assert len(_phase_writes(sneaky)) == 2


def test_store_functions_take_the_session_keyword_only_and_never_commit() -> None:
    modules = (states, repo, claims, records)
    for module in modules:
        for name, function in inspect.getmembers(module, inspect.isfunction):
            session = inspect.signature(function).parameters.get("session")
            if function.__module__ == module.__name__ and session is not None:
                assert session.kind is inspect.Parameter.KEYWORD_ONLY, f"{module.__name__}.{name}"
        tree = ast.parse(Path(module.__file__ or "").read_text())
        commits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "commit"]
        assert commits == [], f"{module.__name__} commits at lines {commits}"


def test_the_domain_imports_nothing_from_the_store() -> None:
    """The store's models are built on the domain's vocabulary; the state machine, which writes through the store,
    sits above both (`controller.states`), so the domain and the store never import each other."""
    code = (
        "import sys, controller.domain\n"
        "print(sorted(m for m in sys.modules if m.startswith('controller.') and not m.startswith('controller.domain')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert found.stdout.strip() == "[]"
