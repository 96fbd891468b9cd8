"""Placeholder files where examples/jobs/local-demo.yaml looks for its data (relative to the submit directory):
`vlctl submit` checks that local inputs exist and are not empty, not what they hold."""

from __future__ import annotations

from pathlib import Path

DEMO_FILES = ("grounding.jsonl", "video_qa.jsonl", "captions.jsonl")  # the example's data.paths, in order


def write_demo_data(root: Path) -> Path:
    folder = root / "data" / "synth" / "train"
    folder.mkdir(parents=True)
    for name in DEMO_FILES:
        (folder / name).write_text('{"text": "placeholder"}\n')
    return folder
