"""`vlctl run` end to end from a user's directory (issue 11): a spec with relative data paths and a relative
`--runs-root`, typed away from the repository, trains the mini model to the end (the ranks themselves run in the
repository). The old code looked for the data in the repository and failed the job after two launches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))
import train_harness  # noqa: E402


def test_run_from_another_directory_with_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "user"
    work.mkdir()
    train_harness.make_data(work / "data")
    spec = {
        "name": "elsewhere",
        "backend": "local",
        "resources": {"nodes": 1, "procs_per_node": 1},
        "training": {
            "model": {"name": "mini"},
            "data": {
                "paths": ["data/train/grounding.jsonl", "data/train/captions.jsonl"],
                "row_len": 256,
                "rows_per_step": 2,
                "num_workers": 0,
            },
            "training": {"steps": 2, "warmup_steps": 1},
            "telemetry": {"enabled": True},
        },
        "fault_tolerance": {"max_restarts": 0},
    }
    (tmp_path / "specs").mkdir()
    spec_path = tmp_path / "specs" / "elsewhere.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("VLCTL_DATABASE_URL", f"sqlite:///{tmp_path / 'vlctl.db'}")
    monkeypatch.chdir(work)

    result = CliRunner().invoke(
        app, ["run", str(spec_path), "--runs-root", "runs", "--poll-seconds", "0.2", "-o", "json"]
    )

    run_dir = work / "runs" / "elsewhere"
    logs = sorted(run_dir.glob("logs/attempt-*/rank-0.log"))
    detail = result.output + "".join(p.read_text()[-3000:] for p in logs)
    assert result.exit_code == 0, detail
    assert json.loads(result.stdout)["phase"] == "succeeded"
    assert [p.parent.name for p in logs] == ["attempt-1"], detail  # one launch
    assert (run_dir / "metrics-rank0.jsonl").stat().st_size > 0
    assert (work / ".cache" / "vlctl-data").is_dir()  # the data cache is the user's too, not the repository's
