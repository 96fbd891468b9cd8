"""`vlctl ... | head`: a CLI whose reader leaves stops quietly (issue 11: `vlctl list -o json | head -c 10`
printed `error: BrokenPipeError ...` and exited 1). The reader is gone before the command writes a byte (the
read end of its stdout pipe is closed first), so every write meets EPIPE, whatever the machine's speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args",
    [
        ("list", "-o", "json"),
        ("list",),
        ("status", "quiet", "-o", "json"),
        ("events", "quiet"),
        ("--version",),
    ],
    ids=["list-json", "list-table", "status-json", "events-table", "version"],
)
def test_a_reader_that_left_ends_the_command_quietly(tmp_path: Path, args: tuple[str, ...]) -> None:
    env = {**os.environ, "VLCTL_DATABASE_URL": f"sqlite:///{tmp_path / 'vlctl.db'}"}
    example = REPO / "examples" / "jobs" / "local-demo.yaml"
    data = tmp_path / "data" / "synth" / "train"
    data.mkdir(parents=True)
    for name in ("grounding.jsonl", "video_qa.jsonl", "captions.jsonl"):
        (data / name).write_text('{"text": "placeholder"}\n')
    spec = tmp_path / "quiet.yaml"
    spec.write_text(example.read_text().replace("name: local-demo", "name: quiet"))
    submitted = subprocess.run(
        [sys.executable, "-m", "cli", "submit", str(spec)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has left
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=REPO,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 0
