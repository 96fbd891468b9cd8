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


def test_invalid_config_is_one_line_and_exit_2(data, tmp_path):
    config = write_config(tmp_path / "train.yaml", data, tmp_path / "run", parallel={"dp": 3})
    proc = torchrun(config, 1)
    assert proc.returncode != 0
    assert "rows_per_step (4) must be divisible by parallel.dp (3)" in proc.stderr


def test_exact_resume_after_sigkill(data, tmp_path):
    """20 steps uninterrupted vs. rank 1 SIGKILLed after step 12 and the job relaunched: same loss, bit for bit."""
    steps = {"steps": 20}
    ckpt = {"interval_steps": 4}
    straight = write_config(
        tmp_path / "a.yaml", data, tmp_path / "a", training=steps, checkpoint=ckpt, parallel={"dp": 2}
    )
    proc = torchrun(straight, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(20))

    crashed = write_config(
        tmp_path / "b.yaml", data, tmp_path / "b", training=steps, checkpoint=ckpt, parallel={"dp": 2}
    )
    fault = {
        "VLCTL_FAULT_CRASH_AT_STEP": "12",
        "VLCTL_FAULT_CRASH_MODE": "kill",
        "VLCTL_FAULT_RANK": "1",
        "VLCTL_FAULT_ONCE_DIR": str(tmp_path / "fault-once"),
    }
    first = torchrun(crashed, 2, env=fault)
    assert first.returncode != 0
    resumed = torchrun(crashed, 2, env=fault)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    got = losses(tmp_path / "b")
    assert got == expected  # floats compared exactly
