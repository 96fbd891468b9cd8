"""The training entry point end to end: torchrun, synthetic data, checkpoints, crash and exact resume."""

from __future__ import annotations

import math

import pytest
from train_harness import losses, make_data, torchrun, write_config

from trainer.contract.checkpoint import latest_valid

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("synthetic"))


def test_single_process_trains_checkpoints_and_exports_metrics(data, tmp_path):
    config = write_config(tmp_path / "train.yaml", data, tmp_path / "run")
    proc = torchrun(config, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = losses(tmp_path / "run")
    assert sorted(recorded) == [0, 1, 2, 3, 4, 5]
    assert all(math.isfinite(v) for v in recorded.values())
    newest = latest_valid(str(tmp_path / "run" / "checkpoints"))
    assert newest is not None and newest.step == 6

    # The newest checkpoint exports as a Hugging Face directory that loads for inference.
    import subprocess
    import sys

    from train_harness import REPO

    from trainer.models.qwen2_vl import from_pretrained

    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.checkpoint.export",
            str(tmp_path / "run" / "checkpoints"),
            str(tmp_path / "hf"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert export.returncode == 0, export.stderr
    assert from_pretrained(tmp_path / "hf").cfg.text.vocab_size == 151936


def test_invalid_config_is_one_line_and_exit_2(data, tmp_path):
    config = write_config(tmp_path / "train.yaml", data, tmp_path / "run", parallel={"dp": 3})
    proc = torchrun(config, 1)
    assert proc.returncode != 0
    assert "rows_per_step (4) must be divisible by parallel.dp (3)" in proc.stderr


def test_checkpoint_saved_at_dp2_resumes_at_dp1(data, tmp_path):
    """Resharding: a dp=2 run's step-4 checkpoint continues at dp=1 with the same losses (global batch fixed)."""
    import shutil

    wide = write_config(
        tmp_path / "dp2.yaml",
        data,
        tmp_path / "dp2",
        training={"steps": 8},
        checkpoint={"interval_steps": 4, "keep_last": 5},
        parallel={"dp": 2},
    )
    proc = torchrun(wide, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = losses(tmp_path / "dp2")

    (tmp_path / "dp1").mkdir()
    shutil.copytree(
        tmp_path / "dp2" / "checkpoints" / "step-00000004", tmp_path / "dp1" / "checkpoints" / "step-00000004"
    )
    narrow = write_config(
        tmp_path / "dp1.yaml",
        data,
        tmp_path / "dp1",
        training={"steps": 8},
        checkpoint={"interval_steps": 4},
        parallel={"dp": 1},
    )
    proc = torchrun(narrow, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    resumed = losses(tmp_path / "dp1")
    assert sorted(resumed) == [4, 5, 6, 7]
    for step in resumed:
        assert abs(resumed[step] - reference[step]) < 1e-5, (step, resumed[step], reference[step])


def test_scraped_telemetry_and_a_slowed_rank(data, tmp_path):
    """Each rank's endpoint serves the contract's metrics during the run; rank 1 slowed 1.5x from step 4 shows
    about 1.5x own work time while every rank's step wall time stays equal."""
    import json
    import statistics
    import time
    import urllib.request

    from train_harness import step_metrics, torchrun_background

    from trainer.contract.telemetry import parse_rank_metrics

    config = write_config(
        tmp_path / "slow.yaml",
        data,
        tmp_path / "run",
        training={"steps": 16},
        checkpoint={"interval_steps": 100},
        parallel={"dp": 2},
    )
    slow = {"VLCTL_FAULT_SLOW_FACTOR": "1.5", "VLCTL_FAULT_SLOW_FROM_STEP": "4", "VLCTL_FAULT_RANK": "1"}
    proc = torchrun_background(config, 2, env=slow, log=tmp_path / "log.txt")
    scraped = {}
    try:
        deadline = time.time() + 240
        while len(scraped) < 2 and time.time() < deadline and proc.poll() is None:
            for rank in (0, 1):
                endpoint = tmp_path / "run" / f"metrics-rank{rank}.endpoint.json"
                if rank in scraped or not endpoint.exists():
                    continue
                url = json.loads(endpoint.read_text())["url"]
                with urllib.request.urlopen(url, timeout=5) as response:
                    sample = parse_rank_metrics(response.read().decode())[0]
                if sample.step is not None and sample.step >= 2:
                    scraped[rank] = sample
            time.sleep(0.5)
        assert proc.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(scraped) == [0, 1]
    for rank, sample in scraped.items():
        assert sample.rank == rank and sample.pid and sample.loss is not None
        assert sample.own_work_seconds and sample.step_seconds and sample.last_progress_timestamp_seconds
        assert {"data", "forward", "backward", "optimizer", "collective_wait"} <= set(sample.phase_seconds)
        assert sample.text_tokens_total and sample.process_start_time_seconds

    steps = range(6, 16)
    per_rank = [step_metrics(tmp_path / "run", rank) for rank in (0, 1)]
    # The ranks' own work is compared step by step (both ranks compute a step's forward and backward at the same
    # time, so they share whatever else the machine is doing then), and the median of those ratios is taken.
    # The injected sleep is (F - 1) x the slowed rank's own measured work, so on a loaded machine it inherits the
    # scheduler's noise on that measurement: next to two busy loops the median ratio for F = 1.5 was seen as high
    # as 1.72; the bounds below still tell a 1.5x rank from an unslowed one (1.0) and from a double-slowed (2.0).
    own_ratio = statistics.median(
        per_rank[1][s]["own_work_seconds"] / per_rank[0][s]["own_work_seconds"] for s in steps
    )
    wall_ratio = statistics.median(
        per_rank[1][s]["step_seconds"] / per_rank[0][s]["step_seconds"] for s in steps
    )
    print(f"own work ratio {own_ratio:.2f}; wall ratio {wall_ratio:.2f}")
    assert 1.25 < own_ratio < 1.85
    assert 0.9 < wall_ratio < 1.1
    fast_wait = statistics.median(per_rank[0][s]["sync_wait_seconds"] for s in steps)
    slow_wait = statistics.median(per_rank[1][s]["sync_wait_seconds"] for s in steps)
    assert fast_wait > slow_wait


def test_sigterm_finishes_the_step_saves_and_exits_preempted(data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from train_harness import REPO, step_metrics

    from trainer.contract.telemetry import EXIT_PREEMPTED

    config = write_config(
        tmp_path / "t.yaml",
        data,
        tmp_path / "run",
        training={"steps": 1000},
        checkpoint={"interval_steps": 1000},
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.train", str(config)],
        cwd=REPO,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics-rank0.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    last = max(step_metrics(tmp_path / "run", 0)) + 1
    newest = latest_valid(str(tmp_path / "run" / "checkpoints"))
    assert newest is not None and newest.step == last
    assert all(m["mfu"] > 0 for m in step_metrics(tmp_path / "run", 0).values())
