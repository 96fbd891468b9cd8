"""The read model: one job view from the store, the same numbers whichever surface renders it, read for many jobs
in a fixed number of queries (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import event, select

from controller import states
from controller.domain.phases import Phase
from controller.store import Store, claim_pending_jobs, create_job, records
from controller.store.models import Job, RankStatus
from controller.views import JobView, RankView, eta_seconds, read_job_view, read_job_views

NOW = datetime.now(UTC)


def _running_job(store: Store, name: str) -> int:
    """A running job at step 40 of 100 with two ranks (rank 1 flagged), a checkpoint at 32, an excluded node."""
    with store.transaction() as session:
        job = create_job(
            session=session,
            name=name,
            spec={
                "backend": "local",
                "resources": {"nodes": 2, "procs_per_node": 1},
                "fault_tolerance": {"max_restarts": 4},
            },
        )
        claim_pending_jobs(session=session, controller_id="c1", lease_seconds=60, limit=1_000)
        states.launch(job, session=session, controller_id="c1", nodes=["local-0", "local-1"])
        states.mark_running(job, session=session)
        job.current_step, job.total_steps, job.loss = 40, 100, 2.5
        job.last_checkpoint_step, job.last_checkpoint_uri = 32, f"/runs/{name}/step-32"
        for rank, (step_s, flagged) in enumerate(((1.0, False), (3.0, True))):
            session.add(
                RankStatus(
                    job_id=job.id, attempt=job.current_attempt, rank=rank, node=f"local-{rank}", step=40,
                    step_s=step_s, own_work_s=step_s, straggler_score=9.0 if flagged else 0.5, flagged=flagged,
                )
            )  # fmt: skip
        records.exclude_node(session=session, node="local-9", reason="Slow", job=job)
        records.exclude_node(session=session, node="bad-0", reason="Broken")  # every job's
        return job.id


def test_a_running_job_viewed_from_the_store(migrated_store: Store) -> None:
    _running_job(migrated_store, "viewed")
    with migrated_store.read() as session:
        (view,) = read_job_views(session)
    assert (view.phase, view.attempt, view.step, view.total_steps, view.progress) == (
        Phase.RUNNING,
        1,
        40,
        100,
        0.4,
    )
    assert (view.nodes, view.procs_per_node, view.max_restarts, view.backend) == (2, 1, 4, "local")
    assert view.last_checkpoint is not None and view.last_checkpoint.step == 32
    assert view.excluded_nodes == ("bad-0", "local-9")
    assert [r.rank for r in view.stragglers] == [1]
    assert view.eta_seconds == 60 * 2.0  # 60 steps left at the ranks' median step time (1 s and 3 s)
    assert view.current_attempt is not None and view.current_attempt.nodes == ("local-0", "local-1")
    data = view.as_dict()
    assert data["stragglers"] == [{"rank": 1, "node": "local-1", "score": 9.0}]
    assert [r["rank"] for r in data["ranks"]] == [0, 1] and data["eta_seconds"] == 120.0
    assert "ranks" not in view.as_dict(ranks=False)


def test_views_of_many_jobs_take_the_same_three_queries(migrated_store: Store) -> None:
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    _running_job(migrated_store, "first")
    event.listen(migrated_store.engine, "before_cursor_execute", count)
    try:
        with migrated_store.read() as session:
            statements.clear()
            assert len(read_job_views(session)) == 1
            one = len(statements)
        for i in range(5):
            _running_job(migrated_store, f"more-{i}")
        with migrated_store.read() as session:
            statements.clear()
            views = read_job_views(session, phases=[Phase.RUNNING])
            assert len(views) == 6 and len(statements) == one == 3
            first = session.scalars(select(Job).where(Job.name == "first")).one()
            assert read_job_view(session, first).name == "first"
    finally:
        event.remove(migrated_store.engine, "before_cursor_execute", count)


def test_eta_only_while_active_and_from_the_median_step_time() -> None:
    assert eta_seconds(Phase.RUNNING, 10, 20, [1.0, 2.0, 9.0]) == 20.0
    assert eta_seconds(Phase.SUCCEEDED, 10, 20, [1.0]) is None
    assert eta_seconds(Phase.RUNNING, 10, None, [1.0]) is None
    assert eta_seconds(Phase.RUNNING, 10, 20, []) is None
    view = JobView(
        name="v", phase=Phase.RUNNING, step=5, total_steps=10, ranks=(RankView(rank=0, node="n", step_s=2.0),)
    )
    assert view.eta_seconds == 10.0
    assert JobView(name="v", phase=None).as_dict()["phase"] is None  # a TrainingJob not admitted yet


def test_finished_jobs_drop_out_of_a_view_limited_to_recent_ones(migrated_store: Store) -> None:
    job_id = _running_job(migrated_store, "done")
    with migrated_store.transaction() as session:
        job = session.get(Job, job_id)
        states.succeed(job, session=session)
        job.finished_at = NOW - timedelta(hours=2)
    with migrated_store.read() as session:
        assert read_job_views(session, phases=[Phase.RUNNING], finished_since=NOW - timedelta(hours=1)) == []
        assert [
            v.name
            for v in read_job_views(session, phases=[Phase.RUNNING], finished_since=NOW - timedelta(hours=3))
        ] == ["done"]
