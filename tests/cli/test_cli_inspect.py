"""`vlctl logs | checkpoints | stragglers` against a real store (SQLite, and PostgreSQL when the local test server
answers) and real log files in a run folder laid out as the local backend writes it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_db import postgres_schema
from typer.testing import CliRunner

from cli import local_logs
from cli.main import app
from controller import states
from controller.backends.local import log_dir
from controller.domain.phases import EventType, SupervisionReason
from controller.store import migrate
from controller.store.claims import claim_jobs
from controller.store.models import RankStatus
from controller.store.records import exclude_node, record_checkpoint, record_checkpoint_verification
from controller.store.repo import append_event, create_job, get_job
from controller.store.session import Store, StoreConfig, open_store

runner = CliRunner()
CONTROLLER = "ctl-test"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path, monkeypatch) -> Iterator[Store]:
    """A migrated store, also the one every command in the test uses (through VLCTL_DATABASE_URL)."""
    with (
        postgres_schema() if request.param == "postgresql" else _just(f"sqlite:///{tmp_path / 'vlctl.db'}")
    ) as url:
        monkeypatch.setenv("VLCTL_DATABASE_URL", url)
        opened = open_store(StoreConfig(url=url))
        migrate.upgrade(opened)
        try:
            yield opened
        finally:
            opened.dispose()


@contextmanager
def _just(url: str) -> Iterator[str]:
    yield url


def run(*args: str):
    return runner.invoke(app, list(args))


def running_job(db: Store, run_dir: Path, name: str = "train") -> None:
    """A job running its first attempt on two nodes, launched through the state machine with a claim."""
    with db.transaction() as session:
        job = create_job(session=session, name=name, spec={"backend": "local"})
        claim_jobs(session=session, controller_id=CONTROLLER, lease_seconds=600, limit=100)
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0", "local-1"])
        states.mark_running(job, session=session, controller_id=CONTROLLER)
        job.run_dir = str(run_dir)


def write_log(run_dir: Path, attempt: int, name: str, body: str) -> Path:
    path = log_dir(run_dir, attempt) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(body)
    return path


# ------------------------------------------------------------------------------------------------------ logs


def test_logs_tail_every_rank_with_a_prefix_or_one_rank_without(db: Store, tmp_path: Path):
    running_job(db, tmp_path)
    for rank in (0, 1, 10):  # numeric order: rank 10 after rank 1
        write_log(tmp_path, 1, f"rank-{rank}.log", "".join(f"r{rank} line {i}\n" for i in range(30)))
    write_log(tmp_path, 1, "node-local-0.log", "torchrun says hello\n")

    every = run("logs", "train", "-n", "2")
    assert every.exit_code == 0, every.output
    assert every.stdout.splitlines() == [
        "[rank 0] r0 line 28", "[rank 0] r0 line 29",
        "[rank 1] r1 line 28", "[rank 1] r1 line 29",
        "[rank 10] r10 line 28", "[rank 10] r10 line 29",
    ]  # fmt: skip
    one = run("logs", "train", "--rank", "1")
    assert one.stdout.splitlines() == [f"r1 line {i}" for i in range(10, 30)]  # 20 lines by default
    node = run("logs", "train", "--node", "local-0")
    assert node.stdout.splitlines() == ["torchrun says hello"]

    as_json = run("logs", "train", "--rank", "0", "-n", "3", "-o", "json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == [
        {
            "attempt": 1,
            "rank": 0,
            "node": None,
            "path": str(log_dir(tmp_path, 1) / "rank-0.log"),
            "lines": ["r0 line 27", "r0 line 28", "r0 line 29"],
        }
    ]


def test_logs_tail_reads_backwards_through_a_large_file(db: Store, tmp_path: Path):
    running_job(db, tmp_path)
    # Longer than a read block, with an unfinished last line (the rank is writing it).
    write_log(
        tmp_path, 1, "rank-0.log", "x" * 100_000 + "\n" + "".join(f"{i}\n" for i in range(5000)) + "part"
    )
    result = run("logs", "train", "--rank", "0", "-n", "3", "-o", "json")
    assert json.loads(result.stdout)[0]["lines"] == ["4998", "4999", "part"]


def test_logs_of_an_older_attempt_and_bad_requests_are_one_line_errors(db: Store, tmp_path: Path):
    with db.transaction() as session:
        create_job(session=session, name="queued", spec={"backend": "local"})
    never = run("logs", "queued")
    assert never.exit_code == 2
    assert never.output.strip() == "error: logs: job 'queued' has never been launched, so it has no logs yet"

    running_job(db, tmp_path)
    write_log(tmp_path, 1, "rank-0.log", "first attempt\n")
    with db.transaction() as session:
        job = get_job(session=session, name="train")
        states.restart(job, session=session, exit_class="RankExited", controller_id=CONTROLLER)
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0", "local-1"])
    write_log(tmp_path, 2, "rank-0.log", "second attempt\n")
    assert run("logs", "train").stdout.splitlines() == ["[rank 0] second attempt"]
    assert run("logs", "train", "--attempt", "1").stdout.splitlines() == ["[rank 0] first attempt"]

    for args, message in [
        (("--attempt", "3"), "error: --attempt: job 'train' has attempts 1 to 2"),
        (("--rank", "5"), f"error: logs: no log of rank 5 for attempt 2 in {log_dir(tmp_path, 2)}"),
        (
            ("--follow", "-o", "json"),
            "error: --follow: not with --output json, which prints a single document",
        ),
        (("--rank", "0", "--node", "local-0"), "error: --rank, --node: give one or the other"),
        (("--node", "../x"), "error: --node: '../x' is not a node name"),
    ]:
        result = run("logs", "train", *args)
        assert (result.exit_code, result.output.strip()) == (2, message), args
    missing = run("logs", "nope")
    assert (missing.exit_code, missing.output.strip()) == (2, "error: no job named 'nope'")


def test_logs_follow_prints_new_lines_and_stops_when_the_job_ends(db: Store, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(local_logs, "FOLLOW_POLL_SECONDS", 0.05)
    running_job(db, tmp_path)
    write_log(tmp_path, 1, "rank-0.log", "before\n")
    write_log(tmp_path, 1, "rank-1.log", "half a li")  # the rank is mid-line
    errors: list[BaseException] = []
    following = threading.Event()
    read_phase = local_logs._job_now

    def observed(*args):
        following.set()  # the tail is printed and the loop runs: what the writer writes now must be followed
        return read_phase(*args)

    monkeypatch.setattr(local_logs, "_job_now", observed)

    def the_job_goes_on() -> None:
        """Another process's writes: more lines, a rank that starts late, a restart, then a cancel."""
        try:
            assert following.wait(timeout=60), "logs --follow never started"
            write_log(tmp_path, 1, "rank-1.log", "ne, finished\n")
            write_log(tmp_path, 1, "rank-2.log", "late rank\n")
            threading.Event().wait(0.2)
            with db.transaction() as session:
                job = get_job(session=session, name="train")
                states.restart(job, session=session, exit_class="RankExited", controller_id=CONTROLLER)
                states.launch(job, session=session, controller_id=CONTROLLER, nodes=["local-0", "local-1"])
            write_log(tmp_path, 2, "rank-0.log", "attempt two\n")
            threading.Event().wait(0.2)
            with db.transaction() as session:
                states.cancel(get_job(session=session, name="train"), session=session)
        except BaseException as err:  # surfaced by the assertion below, not lost in the thread
            errors.append(err)

    writer = threading.Thread(target=the_job_goes_on)
    writer.start()
    try:
        result = run("logs", "train", "--follow")
    finally:
        writer.join()
    assert errors == []
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "[rank 0] before",
        "[rank 1] half a line, finished",
        "[rank 2] late rank",
        "[rank 0] attempt two",
    ]
    assert "--- attempt 2 ---" in result.stderr


def test_logs_follow_of_an_ended_job_prints_the_tail_and_returns(db: Store, tmp_path: Path):
    running_job(db, tmp_path)
    write_log(tmp_path, 1, "rank-0.log", "one\ntwo\nno newline")
    with db.transaction() as session:
        states.cancel(get_job(session=session, name="train"), session=session)
    result = run("logs", "train", "-f", "-r", "0")
    assert (result.exit_code, result.stdout.splitlines()) == (0, ["one", "two", "no newline"])


def test_unreachable_database_is_exit_3_for_every_command(monkeypatch):
    monkeypatch.setenv("VLCTL_DATABASE_URL", "postgresql://vlctl:secret@127.0.0.1:1/nothing")
    for command in ("logs", "checkpoints", "stragglers"):
        result = run(command, "train")
        assert result.exit_code == 3, command
        assert len(result.output.strip().splitlines()) == 1 and "cannot reach the database" in result.output
        assert "secret" not in result.output


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_list_marks_the_next_resume_point(db: Store, tmp_path: Path):
    running_job(db, tmp_path)
    assert run("checkpoints", "train", "-o", "json").stdout.strip() == "[]"
    empty = run("checkpoints", "train")
    assert empty.exit_code == 0 and empty.stdout == "" and "no checkpoints yet" in empty.stderr
    with db.transaction() as session:
        job = get_job(session=session, name="train")
        for step, committed in ((10, True), (20, True), (30, False)):
            record_checkpoint(
                session=session, job=job, step=step, uri=f"file:///c/step-{step}", committed=committed,
                attempt=1, size_bytes=3 * 2**20, save_seconds=1.25,
            )  # fmt: skip
        record_checkpoint_verification(session=session, job=job, step=20, ok=False, detail="bad shard")

    rows = json.loads(run("checkpoints", "train", "-o", "json").stdout)
    assert [(r["step"], r["committed"], r["verified"], r["resume_next"]) for r in rows] == [
        (10, True, None, True),  # the corrupt step 20 is skipped, the unfinished step 30 too
        (20, True, False, False),
        (30, False, None, False),
    ]
    assert rows[0]["size"] == "3.0 MiB" and rows[0]["save_seconds"] == 1.25 and rows[0]["attempt"] == 1
    assert rows[0]["committed_at"] is not None and rows[2]["committed_at"] is None
    table = run("checkpoints", "train").stdout
    assert "CORRUPT" in table and "writing" in table and "<-" in table

    with db.transaction() as session:
        get_job(session=session, name="train").resume_from_step = 20  # what `resume --from-step` would set
    rows = json.loads(run("checkpoints", "train", "-o", "json").stdout)
    assert [r["step"] for r in rows if r["resume_next"]] == [20]
    missing = run("checkpoints", "nope")
    assert (missing.exit_code, missing.output.strip()) == (2, "error: no job named 'nope'")


# ------------------------------------------------------------------------------------------------ stragglers


def test_stragglers_shows_flagged_ranks_their_history_and_excluded_nodes(db: Store, tmp_path: Path):
    running_job(db, tmp_path)
    with db.transaction() as session:
        job = get_job(session=session, name="train")
        for rank, own, flagged in [(0, 1.0, False), (1, 1.0, False), (2, 1.2, False), (3, 3.0, True)]:
            session.add(
                RankStatus(
                    job_id=job.id, attempt=1, rank=rank, node=f"local-{rank // 2}", pid=100 + rank, step=50,
                    own_work_s=own, step_s=3.1, straggler_score=12.0 if flagged else 0.2, flagged=flagged,
                )
            )  # fmt: skip
        # A row left from an earlier attempt: flagged then, not now.
        session.add(
            RankStatus(job_id=job.id, attempt=0, rank=4, node="local-2", flagged=True, own_work_s=9.0)
        )
        append_event(
            session=session, job=job, type=EventType.STRAGGLER, reason=SupervisionReason.STRAGGLER_FLAGGED,
            message="rank 3 on local-1 is a straggler", attempt=1,
            data={"rank": 3, "node": "local-1", "score": 12.0, "slowdown": 3.0, "phase": "compute",
                  "cause": "compute", "step": 50, "windows": 3},
        )  # fmt: skip
        append_event(
            session=session, job=job, type=EventType.STRAGGLER, reason=SupervisionReason.NODE_SLOW,
            message="node local-1 is slow", data={"node": "local-1", "slowdown": 3.0}, attempt=1,
        )  # fmt: skip
        append_event(
            session=session, job=job, type=EventType.DECISION, reason="CheckpointInterval",
            message="not a straggler matter",
        )  # fmt: skip
        append_event(
            session=session, job=job, type=EventType.DECISION, reason=SupervisionReason.EXCLUDE_DECISION,
            message="excluding node local-1", data={"node": "local-1", "exclude": True}, attempt=1,
        )  # fmt: skip
        exclude_node(session=session, node="local-1", reason="Straggler", job=job)

    result = run("stragglers", "train", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["flagged"] == [
        {
            "rank": 3,
            "node": "local-1",
            "attempt": 1,
            "step": 50,
            "score": 12.0,
            "own_work_s": 3.0,
            "others_median_own_work_s": 1.0,
            "slowdown": 3.0,
        }
    ]
    assert [(e["type"], e["reason"]) for e in data["events"]] == [
        ("Straggler", "StragglerFlagged"),
        ("Straggler", "NodeSlow"),
        ("Decision", "ExcludeNodeDecision"),
        ("NodeHealth", "NodeExcluded"),
    ]
    assert data["events"][0]["data"]["windows"] == 3 and data["excluded_nodes"] == ["local-1"]

    table = run("stragglers", "train")
    assert table.exit_code == 0
    assert "3.00x" in table.stdout and "excluded nodes: local-1" in table.stdout


def test_stragglers_of_a_quiet_job(db: Store, tmp_path: Path):
    running_job(db, tmp_path)
    data = json.loads(run("stragglers", "train", "-o", "json").stdout)
    assert data == {"flagged": [], "events": [], "excluded_nodes": []}
    assert "no rank is flagged now" in run("stragglers", "train").stdout
    missing = run("stragglers", "nope")
    assert (missing.exit_code, missing.output.strip()) == (2, "error: no job named 'nope'")
