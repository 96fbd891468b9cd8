"""`vlctl submit | list | status | events | cancel | resume` against a real store: SQLite, and PostgreSQL when
the local test server answers (`VLCTL_TEST_POSTGRES_URL`; `VLCTL_REQUIRE_POSTGRES=1` makes its absence a failure)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cli_db import postgres_schema
from demo_data import write_demo_data
from typer.testing import CliRunner

from cli.main import app
from controller import states
from controller.store import migrate
from controller.store.claims import claim_jobs
from controller.store.models import RankStatus
from controller.store.records import (
    exclude_node,
    record_checkpoint,
    record_checkpoint_verification,
    record_goodput,
)
from controller.store.repo import create_job, get_job
from controller.store.session import Store, StoreConfig, open_store
from controller.store.tables import utcnow

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "local-demo.yaml"
CONTROLLER = "ctl-test"


@pytest.fixture(autouse=True, params=["sqlite", "postgresql"])
def database(request, tmp_path, monkeypatch) -> Iterator[str]:
    """The URL every command in the test uses (through VLCTL_DATABASE_URL)."""
    if request.param == "sqlite":
        monkeypatch.setenv("VLCTL_DATABASE_URL", f"sqlite:///{tmp_path / 'vlctl.db'}")
        yield f"sqlite:///{tmp_path / 'vlctl.db'}"
        return
    with postgres_schema() as url:
        monkeypatch.setenv("VLCTL_DATABASE_URL", url)
        yield url


@pytest.fixture(autouse=True)
def demo_data(tmp_path, monkeypatch) -> None:
    """Submit from a folder holding the example's (relative) data files: submit checks they are there."""
    work = tmp_path / "work"
    write_demo_data(work)
    monkeypatch.chdir(work)


@pytest.fixture
def db(database: str) -> Iterator[Store]:
    opened = open_store(StoreConfig(url=database))
    migrate.upgrade(opened)
    yield opened
    opened.dispose()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_submit_list_status_events_cancel():
    assert run("submit", str(EXAMPLE)).exit_code == 0
    listed = json.loads(run("list", "-o", "json").stdout)
    assert [(j["name"], j["phase"]) for j in listed] == [("local-demo", "pending")]
    status = json.loads(run("status", "local-demo", "-o", "json").stdout)
    assert status["attempt"] == 0 and status["backend"] == "local"
    cancelled = run("cancel", "local-demo", "--yes", "-o", "json")
    assert cancelled.exit_code == 0 and json.loads(cancelled.stdout)["phase"] == "cancelled"
    timeline = json.loads(run("events", "local-demo", "-o", "json").stdout)
    assert [e["seq"] for e in timeline] == list(range(1, len(timeline) + 1))
    assert timeline[0]["type"] == "Submitted" and timeline[-1]["type"] == "PhaseChanged"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("resources", "nodes"), 3, "training.parallel: dp x tp x pp = 2 x 1 x 1 = 2 must equal"),
        (("resources", "procs_per_node"), "two", "resources.procs_per_node: Input should be a valid integer"),
        (("name",), "Local_Demo", "name: 'Local_Demo' is not a DNS-1123 label"),
        (("training", "model", "name"), "13b", "training.model.name: unknown preset '13b'"),
    ],
    ids=["gang-size", "wrong-type", "not-dns-1123", "unknown-preset"],
)
@pytest.mark.parametrize("command", ["submit", "run"])
def test_invalid_spec_exits_2_with_the_field_and_writes_nothing(tmp_path, path, value, message, command):
    spec = yaml.safe_load(EXAMPLE.read_text())
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    result = run(command, str(bad))
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert json.loads(run("list", "-o", "json").stdout) == []


def test_duplicate_and_unknown_names_are_one_line_errors():
    assert run("submit", str(EXAMPLE)).exit_code == 0
    again = run("submit", str(EXAMPLE))
    assert again.exit_code == 2 and "already exists" in again.output
    missing = run("status", "nope")
    assert missing.exit_code == 2 and missing.output.strip() == "error: no job named 'nope'"


def test_cancel_needs_yes_when_not_interactive():
    assert run("submit", str(EXAMPLE)).exit_code == 0
    result = run("cancel", "local-demo")
    assert result.exit_code == 2 and "--yes" in result.output


def test_unreachable_database_is_one_line(monkeypatch):
    monkeypatch.setenv("VLCTL_DATABASE_URL", "postgresql://vlctl:secret@127.0.0.1:1/nothing")
    for args in (["list"], ["status", "x"], ["resume", "x", "--yes"]):
        result = run(*args)
        assert result.exit_code == 3, args
        assert len(result.output.strip().splitlines()) == 1, args
        assert "cannot reach the database" in result.output and "secret" not in result.output


# ---------------------------------------------------------------------------------- status and resume


def launch_running_job(db: Store, name: str, *, nodes: tuple[str, ...] = ("local-0", "local-1")) -> None:
    """A job on its first attempt, running, through the state machine (a controller's claim, as for real)."""
    with db.transaction() as session:
        job = create_job(session=session, name=name, spec={"backend": "local"})
        claim_jobs(session=session, controller_id=CONTROLLER, lease_seconds=600, limit=100)
        states.launch(job, session=session, controller_id=CONTROLLER, nodes=list(nodes))
        states.mark_running(job, session=session, controller_id=CONTROLLER)


def add_checkpoints(db: Store, name: str) -> None:
    """Step 10 committed, step 20 committed but corrupt, step 30 still being written."""
    with db.transaction() as session:
        job = get_job(session=session, name=name)
        for step, committed in ((10, True), (20, True), (30, False)):
            record_checkpoint(
                session=session, job=job, step=step, uri=f"file:///ckpt/{name}/step-{step}", committed=committed,
                attempt=1, size_bytes=3 * 2**20, save_seconds=1.5,
            )  # fmt: skip
        record_checkpoint_verification(session=session, job=job, step=20, ok=False, detail="shard 0 checksum")


def test_status_json_has_progress_goodput_attempt_and_every_rank(db: Store):
    launch_running_job(db, "train")
    now = utcnow()
    with db.transaction() as session:
        job = get_job(session=session, name="train")
        job.current_step, job.total_steps, job.loss, job.tokens_per_second = 40, 100, 2.5, 1234.0
        job.progress_at, job.checkpoint_interval_steps, job.run_dir = now, 10, "/runs/train"
        record_checkpoint(
            session=session, job=job, step=10, uri="file:///ckpt/step-10", committed=True, now=now
        )
        record_goodput(
            session=session,
            job=job,
            productive_seconds=80.0,
            lost_seconds={"startup": 15.0, "restart": 5.0},
            ettr=0.8,
        )
        exclude_node(session=session, node="local-9", reason="Straggler", job=job)
        for rank, (step_s, own, flagged) in enumerate(
            [(0.5, 0.4, False), (0.5, 0.4, False), (0.6, 0.5, False), (2.0, 1.9, True)]
        ):
            session.add(
                RankStatus(
                    job_id=job.id, attempt=1, rank=rank, node=f"local-{rank // 2}", pid=1000 + rank, step=40,
                    last_progress_at=now - timedelta(seconds=rank), own_work_s=own, step_s=step_s, loss=2.5,
                    straggler_score=9.0 if flagged else 0.5, flagged=flagged,
                )
            )  # fmt: skip

    result = run("status", "train", "-o", "json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    # The keys `list` has stay, with the current attempt's start now filled in.
    assert (status["name"], status["phase"], status["attempt"], status["restarts"]) == (
        "train",
        "running",
        1,
        0,
    )
    assert status["attempt_started"] is not None and status["ettr"] == 0.8
    assert (status["step"], status["total_steps"], status["progress"]) == (40, 100, 0.4)
    assert status["eta_seconds"] == pytest.approx(60 * 0.55)  # 60 steps left x the median step time
    assert status["last_checkpoint"]["step"] == 10 and status["last_checkpoint"]["committed_at"] is not None
    assert (
        status["lost_seconds"] == {"startup": 15.0, "restart": 5.0} and status["productive_seconds"] == 80.0
    )
    assert status["excluded_nodes"] == ["local-9"]
    assert status["current_attempt"]["number"] == 1 and status["current_attempt"]["nodes"] == [
        "local-0",
        "local-1",
    ]
    assert status["checkpoint_interval_steps"] == 10 and status["run_dir"] == "/runs/train"
    ranks = status["ranks"]
    assert [(r["rank"], r["node"], r["pid"], r["step"]) for r in ranks] == [
        (0, "local-0", 1000, 40), (1, "local-0", 1001, 40), (2, "local-1", 1002, 40), (3, "local-1", 1003, 40),
    ]  # fmt: skip
    assert [r["flagged"] for r in ranks] == [False, False, False, True] and ranks[3]["straggler_score"] == 9.0
    assert ranks[3]["own_work_s"] == 1.9 and ranks[0]["last_progress"].startswith(now.isoformat()[:19])

    table = run("status", "train")
    assert table.exit_code == 0
    assert "step 40 / 100 (40.0%)" in table.stdout and "ETA 33.0 s" in table.stdout
    assert "local-9" in table.stdout and "1003" in table.stdout


def test_status_of_a_job_never_launched_has_no_ranks_and_no_eta():
    assert run("submit", str(EXAMPLE)).exit_code == 0
    status = json.loads(run("status", "local-demo", "-o", "json").stdout)
    assert status["ranks"] == [] and status["current_attempt"] is None and status["eta_seconds"] is None
    assert status["last_checkpoint"] is None and status["excluded_nodes"] == []
    assert run("status", "local-demo").exit_code == 0


def test_resume_reopens_a_failed_job_from_a_valid_checkpoint(db: Store):
    launch_running_job(db, "broken")
    add_checkpoints(db, "broken")
    with db.transaction() as session:
        states.fail(get_job(session=session, name="broken"), session=session, message="gave up")

    corrupt = run("resume", "broken", "--from-step", "20", "--yes")
    assert corrupt.exit_code == 2
    assert corrupt.stderr.strip().splitlines() == [
        "error: --from-step: job 'broken' has no committed, valid checkpoint at step 20 (available: 10)"
    ]
    assert json.loads(run("status", "broken", "-o", "json").stdout)["phase"] == "failed"

    resumed = run("resume", "broken", "--from-step", "10", "--yes", "-o", "json")
    assert resumed.exit_code == 0, resumed.output
    data = json.loads(resumed.stdout)
    assert (data["phase"], data["resume_from_step"], data["restarts_counted"]) == ("restarting", 10, 0)
    assert "restarts from the checkpoint at step 10" in resumed.stderr
    last = json.loads(run("events", "broken", "-o", "json").stdout)[-1]
    assert (last["reason"], last["data"]["from"], last["data"]["from_step"]) == (
        "ResumeRequested",
        "failed",
        10,
    )


def test_resume_without_a_step_reopens_a_cancelled_job():
    assert run("submit", str(EXAMPLE)).exit_code == 0
    assert run("cancel", "local-demo", "--yes").exit_code == 0
    resumed = run("resume", "local-demo", "--yes", "-o", "json")
    assert resumed.exit_code == 0
    assert (
        json.loads(resumed.stdout)["phase"] == "restarting"
        and json.loads(resumed.stdout)["resume_from_step"] is None
    )


def test_resume_of_a_running_job_sets_the_step_of_its_next_restart(db: Store):
    launch_running_job(db, "live")
    add_checkpoints(db, "live")

    bare = run("resume", "live", "--yes")
    assert bare.exit_code == 2 and len(bare.output.strip().splitlines()) == 1 and "--from-step" in bare.output

    result = run("resume", "live", "--from-step", "10", "--yes", "-o", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["phase"], data["resume_from_step"]) == ("running", 10)
    assert "next restart resumes from the checkpoint at step 10" in result.stderr
    last = json.loads(run("events", "live", "-o", "json").stdout)[-1]
    assert (last["type"], last["reason"], last["data"]) == ("Decision", "ResumeRequested", {"from_step": 10})
    assert json.loads(run("status", "live", "-o", "json").stdout)["resume_from_step"] == 10


def test_resume_refuses_a_succeeded_job_and_needs_yes_when_not_interactive(db: Store):
    launch_running_job(db, "done")
    with db.transaction() as session:
        states.succeed(get_job(session=session, name="done"), session=session)
    refused = run("resume", "done", "--yes")
    assert refused.exit_code == 2
    assert refused.output.strip() == "error: resume: job 'done' succeeded; there is nothing to resume"

    assert run("submit", str(EXAMPLE)).exit_code == 0
    assert run("cancel", "local-demo", "--yes").exit_code == 0
    unconfirmed = run("resume", "local-demo")
    assert unconfirmed.exit_code == 2 and "--yes" in unconfirmed.output
    assert json.loads(run("status", "local-demo", "-o", "json").stdout)["phase"] == "cancelled"

    missing = run("resume", "nope", "--yes")
    assert missing.exit_code == 2 and missing.output.strip() == "error: no job named 'nope'"


def test_cancelling_twice_says_already_cancelled_and_an_ended_job_cannot_be(db: Store):
    """Issue 11: a second cancel answered in state-machine words ("cannot go from cancelled to cancelled")."""
    launch_running_job(db, "twice")
    first = run("cancel", "twice", "--yes", "-o", "json")
    assert first.exit_code == 0 and "cancelled twice" in first.stderr
    assert json.loads(first.stdout)["attempt_started"] is not None  # the attempt the cancel ended
    again = run("cancel", "twice", "--yes")
    assert again.exit_code == 0, again.output
    assert again.stderr.strip() == "twice is already cancelled"
    timeline = json.loads(run("events", "twice", "-o", "json").stdout)
    assert [e["message"] for e in timeline].count("cancelled from the CLI") == 1  # cancelled once

    launch_running_job(db, "ended")
    with db.transaction() as session:
        states.fail(get_job(session=session, name="ended"), session=session, message="crashed")
    ended = run("cancel", "ended", "--yes")
    assert ended.exit_code == 2
    assert (
        ended.stderr.strip()
        == "error: cancel: job 'ended' already ended (failed); there is nothing to cancel"
    )
