"""Run `python -m trainer.train` under torchrun on synthetic data, and read back what the ranks recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from trainer.data import synthetic

REPO = Path(__file__).resolve().parents[2]


def make_data(root: Path) -> list[str]:
    synthetic.generate(str(root), seed=0, num_images=24, num_videos=4, num_texts=12)
    return sorted(str(p) for p in (root / "train").glob("*.jsonl"))


def write_config(path: Path, data: list[str], run_dir: Path, **sections) -> Path:
    config = {
        "run_dir": str(run_dir),
        "model": {"name": "mini"},
        "data": {
            "paths": data,
            "row_len": 256,
            "rows_per_step": 4,
            "micro_batch_rows": 1,
            "num_workers": 0,
            "cache_dir": str(path.parent / "data-cache"),
        },
        "training": {"steps": 6, "lr": 1e-3, "warmup_steps": 2, "grad_clip": 1.0},
        "checkpoint": {"interval_steps": 3, "async_save": True},
        "telemetry": {"enabled": True},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def _command(config: Path, nproc: int, overrides: tuple[str, ...]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "trainer.train",
        str(config),
        *overrides,
    ]


def _env(extra: dict | None) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        **(extra or {}),
    }


def torchrun(
    config: Path, nproc: int, *overrides: str, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(config, nproc, overrides),
        cwd=REPO,
        env=_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def losses(run_dir: Path, rank: int = 0) -> dict[int, float]:
    """Loss per step from the rank's metrics file; a step recorded twice (re-run after a resume) keeps the last."""
    out: dict[int, float] = {}
    for line in (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def torchrun_background(
    config: Path, nproc: int, *overrides: str, env: dict | None = None, log: Path | None = None
) -> subprocess.Popen:
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed by the OS with the child
    return subprocess.Popen(
        _command(config, nproc, overrides), cwd=REPO, env=_env(env), stdout=out, stderr=subprocess.STDOUT
    )


def step_metrics(run_dir: Path, rank: int) -> dict[int, dict]:
    """Every step's metrics line of one rank (the last one when a step was recorded twice)."""
    out: dict[int, dict] = {}
    for line in (run_dir / f"metrics-rank{rank}.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "own_work_seconds" in record:
            out[record["step"]] = record
    return out
