"""The store: URLs and connections, migrations against the models, jobs, listings in one query, records."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import JSON, DateTime, column, delete, event, func, insert, inspect, select, table, text
from sqlalchemy.exc import OperationalError

from controller import states
from controller.domain.phases import Phase
from controller.store import (
    Attempt,
    Event,
    Job,
    JobExists,
    Store,
    StoreConfig,
    StoreUnavailable,
    claim_pending_jobs,
    create_job,
    get_job,
    list_jobs_with_latest_attempt,
    migrate,
    open_store,
    records,
    resolve_database_url,
)
from controller.store.records import RankWindowStats
from controller.store.repo import append_event

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched_job(store: Store, name: str, *, attempts: int = 1) -> int:
    """A job launched `attempts` times (restarted in between); returns its id."""
    with store.transaction() as session:
        job = create_job(session=session, name=name, spec={"steps": 10})
        claim_pending_jobs(session=session, controller_id="c1", lease_seconds=60, limit=1_000)
        for number in range(attempts):
            if number:
                states.restart(job, session=session, exit_class="RankExited")
            states.launch(job, session=session, controller_id="c1", nodes=["local-0", "local-1"])
        return job.id


# --- URLs and connections -------------------------------------------------------------------------------------


def test_default_url_is_sqlite_in_the_user_data_folder_and_env_overrides(tmp_path: Path) -> None:
    assert (
        str(resolve_database_url(env={"XDG_DATA_HOME": str(tmp_path)}))
        == f"sqlite:///{tmp_path}/vlctl/vlctl.db"
    )
    home_default = resolve_database_url(env={})
    assert str(home_default).endswith(".local/share/vlctl/vlctl.db")
    override = resolve_database_url(env={"VLCTL_DATABASE_URL": "postgresql://u:pw@db:5432/vlctl"})
    assert override.drivername == "postgresql+psycopg"
    with pytest.raises(ValueError, match="VLCTL_DATABASE_URL: unsupported database 'mysql'"):
        resolve_database_url(env={"VLCTL_DATABASE_URL": "mysql://u@h/db"})


def test_open_store_follows_vlctl_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLCTL_DATABASE_URL", f"sqlite:///{tmp_path}/from-env.db")
    store = open_store()
    store.dispose()
    assert store.url == f"sqlite:///{tmp_path}/from-env.db" and (tmp_path / "from-env.db").exists()


def test_sqlite_store_creates_its_folder_and_runs_in_wal_with_foreign_keys(tmp_path: Path) -> None:
    store = open_store(StoreConfig(url=f"sqlite:///{tmp_path}/a/b/vlctl.db", busy_timeout_s=7))
    try:
        with store.read() as session:
            pragma = {
                name: session.execute(text(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout")
            }
        assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 7000}
    finally:
        store.dispose()


def test_sqlite_write_transactions_take_the_write_lock_at_begin(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/vlctl.db"
    first, second = open_store(StoreConfig(url=url)), open_store(StoreConfig(url=url, busy_timeout_s=0.1))
    try:
        with first.transaction() as session:
            session.execute(text("SELECT 1"))  # reads only, yet holds the write lock (BEGIN IMMEDIATE)
            with pytest.raises(OperationalError, match="database is locked"), second.transaction() as other:
                other.execute(text("SELECT 1"))
            with second.read() as reader:  # readers are never blocked (WAL, deferred BEGIN)
                assert reader.execute(text("SELECT 1")).scalar() == 1
    finally:
        first.dispose()
        second.dispose()


def test_unreachable_postgres_is_one_clear_error_without_the_password() -> None:
    url = f"postgresql+psycopg://vlctl:hunter2@127.0.0.1:{_free_port()}/vlctl"
    with pytest.raises(StoreUnavailable) as info:
        open_store(StoreConfig(url=url, connect_timeout_s=2))
    message = str(info.value)
    assert message.startswith("cannot reach the database at postgresql+psycopg://vlctl:***@127.0.0.1:")
    assert "hunter2" not in message and "\n" not in message


def test_sqlite_file_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(StoreUnavailable, match="cannot reach the database at sqlite:///"):
        open_store(StoreConfig(url=f"sqlite:///{tmp_path}/taken/vlctl.db"))


# --- migrations ----------------------------------------------------------------------------------------------


def test_migrations_upgrade_an_empty_database_to_exactly_the_models(empty_db_url: str) -> None:
    store = open_store(StoreConfig(url=empty_db_url))
    try:
        assert migrate.current_revision(store) is None
        migrate.upgrade(store)
        assert migrate.current_revision(store) == migrate.head_revision()
        assert migrate.schema_differences(store) == []
        migrate.upgrade(store)  # at head already: nothing to do

        migrate.downgrade(store, "base")
        assert set(inspect(store.engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(store)

        # The comparison is not vacuous: a dropped index shows up as a difference.
        with store.transaction() as session:
            session.execute(text("DROP INDEX ix_jobs_phase"))
        assert any("ix_jobs_phase" in repr(diff) for diff in migrate.schema_differences(store))
    finally:
        store.dispose()


def test_a_store_at_the_newest_schema_is_upgraded_without_importing_alembic(empty_db_url: str) -> None:
    """Every CLI command upgrades first: the usual case, nothing to do, is one read (Alembic costs 0.3 s of CPU)."""
    from alembic.script import ScriptDirectory

    assert migrate.head_revision() == ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    store = open_store(StoreConfig(url=empty_db_url))
    try:
        migrate.upgrade(store)
    finally:
        store.dispose()
    code = (
        "import sys\n"
        "from controller.store import StoreConfig, migrate, open_store\n"
        "store = open_store(StoreConfig(url=sys.argv[1]))\n"
        "migrate.upgrade(store)\n"
        "print(migrate._stored_revision(store), 'alembic' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, empty_db_url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [migrate.head_revision(), "False"]


def test_migration_0003_copies_each_failure_classification_from_its_event_onto_the_attempt(
    empty_db_url: str,
) -> None:
    """Before 0003 a classification lived only in the Failure event's data. The upgrade copies it onto the
    attempt, with the old reader's defaults for what is missing, and leaves attempts without one unclassified."""
    attempts_at_0002 = table(
        "attempts",
        column("job_id"),
        column("number"),
        column("nodes", JSON()),
        column("launched_by"),
        column("started_at", DateTime(timezone=True)),
        column("exit_class"),
    )
    failures = {
        1: ("Crash", "rank 0 exited with code 1", {"exit_class": "Crash", "retryable": True, "step": 7}),
        # No `retryable` (the old reader took it as True); the attempt's own class was never written.
        2: (
            None,
            "lost node local-1",
            {"exit_class": "NodeLost", "counts_toward_limit": False, "step": None},
        ),
        # A Failure event that is no classification (the stacks dumped before a hang's stop).
        3: ("Hang", "no rank made progress", {"ranks": [0, 1], "first_stalled": [0]}),
    }
    store = open_store(StoreConfig(url=empty_db_url))
    try:
        migrate.upgrade(store, "0002")
        with store.transaction() as session:
            job = create_job(session=session, name="old", spec={}, now=T0)
            session.execute(
                insert(attempts_at_0002),
                [
                    {
                        "job_id": job.id,
                        "number": number,
                        "nodes": ["local-0"],
                        "launched_by": "c1",
                        "started_at": T0,
                        "exit_class": failures[number][0] if number in failures else None,
                    }
                    for number in (1, 2, 3, 4)  # 4: still running
                ],
            )
            for number, (_, message, data) in failures.items():
                reason = str(data.get("exit_class", "StacksDumped"))
                append_event(
                    session=session,
                    job=job,
                    type="Failure",
                    reason=reason,
                    message=message,
                    data=data,
                    attempt=number,
                )
        migrate.upgrade(store)

        classified = (
            Attempt.number,
            Attempt.exit_class,
            Attempt.retryable,
            Attempt.counts_toward_limit,
            Attempt.failure_step,
            Attempt.failure_message,
        )
        with store.read() as session:
            rows = [tuple(row) for row in session.execute(select(*classified).order_by(Attempt.number))]
        assert rows == [
            (1, "Crash", True, True, 7, "rank 0 exited with code 1"),
            (2, "NodeLost", True, False, None, "lost node local-1"),
            (3, "Hang", None, None, None, None),
            (4, None, None, None, None, None),
        ]

        migrate.downgrade(store, "0002")
        names = {c["name"] for c in inspect(store.engine).get_columns("attempts")}
        assert names.isdisjoint({"retryable", "counts_toward_limit", "failure_step", "failure_message"})
    finally:
        store.dispose()


def test_two_controllers_upgrading_at_once_both_succeed(empty_db_url: str) -> None:
    stores = [open_store(StoreConfig(url=empty_db_url)) for _ in range(2)]
    errors: list[BaseException] = []

    def run(store: Store) -> None:
        try:
            migrate.upgrade(store)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert migrate.current_revision(stores[0]) == migrate.head_revision()
    finally:
        for store in stores:
            store.dispose()


# --- jobs and listings ---------------------------------------------------------------------------------------


def test_create_job_validates_the_name_and_rejects_duplicates(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        with pytest.raises(ValueError, match="name: 'Bad_Name' is not a DNS-1123 label"):
            create_job(session=session, name="Bad_Name", spec={})
        create_job(session=session, name="train-1", spec={"model": "tiny"}, now=T0)
        with pytest.raises(JobExists, match="name: a job named 'train-1' already exists"):
            create_job(session=session, name="train-1", spec={})
        create_job(session=session, name="train-2", spec={})  # the transaction is still usable
    with migrated_store.read() as session:
        job = get_job(session=session, name="train-1")
        assert (job.phase, job.spec, job.created_at, job.event_seq) == (
            Phase.PENDING,
            {"model": "tiny"},
            T0,
            1,
        )
        assert job.created_at.tzinfo is UTC
        assert session.scalar(select(func.count()).select_from(Job)) == 2


def test_listing_jobs_with_their_latest_attempt_is_one_query(migrated_store: Store) -> None:
    expected = {f"job-{i}": i % 3 for i in range(12)}  # 0, 1 or 2 attempts
    for name, num_attempts in expected.items():
        if num_attempts:
            _launched_job(migrated_store, name, attempts=num_attempts)
        else:
            with migrated_store.transaction() as session:
                create_job(session=session, name=name, spec={})

    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731 - (conn, cursor, statement, ...)
    event.listen(migrated_store.engine, "before_cursor_execute", listener)
    try:
        with migrated_store.read() as session:
            rows = list_jobs_with_latest_attempt(session=session)
            seen = {
                job.name: (attempt.number if attempt else 0, attempt.nodes if attempt else None)
                for job, attempt in rows
            }
            only_launching = list_jobs_with_latest_attempt(session=session, phases=[Phase.LAUNCHING])
    finally:
        event.remove(migrated_store.engine, "before_cursor_execute", listener)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) == 2  # one per listing
    assert {name: number for name, (number, _) in seen.items()} == expected
    assert seen["job-1"][1] == ["local-0", "local-1"]
    assert {job.name for job, _ in only_launching} == {name for name, n in expected.items() if n}


def test_deleting_a_job_deletes_its_history(migrated_store: Store) -> None:
    job_id = _launched_job(migrated_store, "doomed")
    with migrated_store.transaction() as session:
        session.execute(delete(Job).where(Job.id == job_id))
    with migrated_store.read() as session:
        assert session.scalar(select(func.count()).select_from(Attempt)) == 0
        assert session.scalar(select(func.count()).select_from(Event)) == 0


# --- checkpoints, rank windows, node health, goodput --------------------------------------------------------


def test_last_checkpoint_is_the_newest_committed_one_not_known_corrupt(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="ckpt", spec={})
        for step in (100, 200):
            records.record_checkpoint(
                session=session,
                job=job,
                step=step,
                uri=f"file:///c/step-{step}",
                committed=True,
                size_bytes=10**10,
                save_seconds=2.5,
            )
        records.record_checkpoint(
            session=session, job=job, step=300, uri="file:///c/step-300", committed=False
        )
        assert (job.last_checkpoint_step, job.last_checkpoint_uri) == (200, "file:///c/step-200")

        records.record_checkpoint_verification(
            session=session, job=job, step=200, ok=False, detail="checksum mismatch"
        )
        assert job.last_checkpoint_step == 100
        resumable = records.newest_resumable_checkpoint(session=session, job_id=job.id)
        assert resumable is not None and resumable.size_bytes == 10**10

        records.record_checkpoint(
            session=session, job=job, step=300, uri="file:///c/step-300", committed=True
        )
        assert job.last_checkpoint_step == 300
        reasons = [
            e.reason for e in session.scalars(select(Event).where(Event.job_id == job.id).order_by(Event.seq))
        ]
    assert reasons == [
        "Submitted",
        "CheckpointCommitted",
        "CheckpointCommitted",
        "CheckpointCorrupt",
        "CheckpointCommitted",
    ]


def test_a_corrupt_checkpoint_saved_anew_is_committed_again_and_events_carry_their_attempt(
    migrated_store: Store,
) -> None:
    """Issue 11: CheckpointCorrupt had `attempt: null`, and the re-save of a step found corrupt (after a resume
    from an older one) got no CheckpointCommitted event, so the timeline never showed the step as good again."""
    job_id = _launched_job(migrated_store, "resaved", attempts=2)
    with migrated_store.transaction() as session:
        job = session.get(Job, job_id)
        records.record_checkpoint(
            session=session, job=job, step=10, uri="file:///c/step-10", committed=True, attempt=1
        )
        records.record_checkpoint_verification(session=session, job=job, step=10, ok=False, detail="crc")
        records.record_checkpoint_verification(
            session=session, job=job, step=10, ok=False, detail="crc", attempt=3
        )
        assert job.last_checkpoint_step is None
        records.record_checkpoint(
            session=session, job=job, step=10, uri="file:///c/step-10", committed=True, attempt=3
        )
        assert job.last_checkpoint_step == 10
        events = [
            (e.reason, e.attempt, e.message)
            for e in session.scalars(select(Event).where(Event.job_id == job.id).order_by(Event.seq))
            if e.reason.startswith("Checkpoint")
        ]
    assert [(reason, attempt) for reason, attempt, _ in events] == [
        ("CheckpointCommitted", 1),
        ("CheckpointCorrupt", 2),  # the job's current attempt by default
        ("CheckpointCorrupt", 3),  # or the attempt the check chose a resume point for
        ("CheckpointCommitted", 3),
    ]
    assert "again" in events[-1][2]


def _window(rank: int, start: int, *, flagged: bool = False) -> RankWindowStats:
    return RankWindowStats(
        rank=rank,
        node=f"local-{rank // 2}",
        window_start_step=start,
        window_end_step=start + 9,
        num_steps=10,
        mean_own_s=0.5 + rank,
        median_own_s=0.5,
        p90_own_s=0.7,
        mean_wall_s=1.0,
        straggler_score=float(rank),
        flagged=flagged,
    )


def test_rank_windows_are_written_in_bulk_read_per_rank_and_pruned(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="windows", spec={})
        for start in (0, 10, 20, 30):
            records.record_rank_windows(
                session=session,
                job_id=job.id,
                attempt=1,
                windows=[_window(r, start, flagged=(r == 3 and start == 0)) for r in range(4)],
            )
        latest = records.latest_rank_windows(session=session, job_id=job.id, attempt=1)
        assert [(w.rank, w.window_start_step, w.node) for w in latest] == [
            (r, 30, f"local-{r // 2}") for r in range(4)
        ]

        assert (
            records.prune_rank_windows(session=session, job_id=job.id, keep_windows=2) == 7
        )  # 8 old, 1 flagged
        kept = session.execute(
            select(records.RankStepWindow.rank, records.RankStepWindow.window_start_step)
        ).all()
    assert sorted(kept) == sorted([(3, 0)] + [(r, s) for r in range(4) for s in (20, 30)])
    with pytest.raises(ValueError, match="window_end_step"):
        RankWindowStats(
            rank=0,
            node="n",
            window_start_step=5,
            window_end_step=4,
            num_steps=1,
            mean_own_s=0,
            median_own_s=0,
            p90_own_s=0,
            mean_wall_s=0,
        )


def test_node_exclusions_are_scoped_and_expire(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="nodes", spec={})
        other = create_job(session=session, name="other", spec={})
        records.exclude_node(
            session=session,
            node="gpu-1",
            reason="Straggler",
            job=job,
            expires_at=T0 + timedelta(hours=1),
            now=T0,
        )
        records.exclude_node(session=session, node="gpu-2", reason="NodeLost")
        assert records.excluded_nodes(session=session, job_id=job.id, now=T0) == {"gpu-1", "gpu-2"}
        assert records.excluded_nodes(session=session, job_id=other.id, now=T0) == {"gpu-2"}
        assert records.excluded_nodes(session=session, job_id=job.id, now=T0 + timedelta(hours=2)) == {
            "gpu-2"
        }
        assert records.clear_node_exclusion(session=session, node="gpu-2") == 1
        assert records.excluded_nodes(session=session, now=T0) == set()
        assert job.event_seq == 2  # Submitted, NodeExcluded


def test_goodput_is_stored_and_validated(migrated_store: Store) -> None:
    with migrated_store.transaction() as session:
        job = create_job(session=session, name="goodput", spec={})
        records.record_goodput(
            session=session,
            job=job,
            productive_seconds=90.0,
            lost_seconds={"restart": 8.0, "startup": 2.0},
            ettr=0.9,
        )
        with pytest.raises(ValueError, match="ettr"):
            records.record_goodput(
                session=session, job=job, productive_seconds=1.0, lost_seconds={}, ettr=1.5
            )
    with migrated_store.read() as session:
        job = get_job(session=session, name="goodput")
        assert (job.productive_seconds, job.lost_seconds, job.ettr) == (
            90.0,
            {"restart": 8.0, "startup": 2.0},
            0.9,
        )


def test_rank_status_leaves_room_on_its_pages_for_in_place_updates(postgres_only_url):
    # Migration 0004: fillfactor 50, so that the rank rows refreshed every second update heap-only (their WAL at
    # 16,384 ranks: 98-100 KB/s with full pages, 38 KB/s with room; bench_controller_scale measures it).
    from sqlalchemy import text

    store = open_store(StoreConfig(url=postgres_only_url))
    try:
        migrate.upgrade(store)
        with store.read() as session:
            options = session.execute(
                text("SELECT reloptions FROM pg_class WHERE oid = 'rank_status'::regclass")
            ).scalar_one()
        assert options == ["fillfactor=50"]
        migrate.downgrade(store, "0003")
        with store.read() as session:
            assert (
                session.execute(
                    text("SELECT reloptions FROM pg_class WHERE oid = 'rank_status'::regclass")
                ).scalar_one()
                is None
            )
    finally:
        store.dispose()
