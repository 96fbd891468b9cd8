"""`vlctl submit | list | status | events | cancel` against a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "jobs" / "local-demo.yaml"


@pytest.fixture(autouse=True)
def database(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCTL_DATABASE_URL", f"sqlite:///{tmp_path / 'vlctl.db'}")


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


def test_invalid_spec_exits_2_and_writes_nothing(tmp_path):
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["resources"]["nodes"] = 3  # dp x tp x pp = 2 does not match 3 x 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    result = run("submit", str(bad))
    assert result.exit_code == 2
    assert "training.parallel: dp x tp x pp = 2 x 1 x 1 = 2 must equal" in result.output
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
    result = run("list")
    assert result.exit_code == 3
    assert "cannot reach the database" in result.output and "secret" not in result.output
