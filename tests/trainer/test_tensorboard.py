"""`telemetry.tensorboard`: rank 0's TensorBoard event files, read back with TensorBoard's own reader.

TensorBoard stores these scalars as float32, so every comparison with the JSONL file (float64) is made at float32
precision: the reader's value must equal the JSONL value rounded to float32, exactly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_harness import REPO, make_data, write_config

from trainer.contract.telemetry import RankLabels
from trainer.contract.training import ConfigError, load_training_config
from trainer.telemetry import RankTelemetry, TelemetryConfig, TensorBoardSink, read_jsonl
from trainer.telemetry.sinks import TENSORBOARD_DIR, TENSORBOARD_TAGS, TOKENS_PER_SECOND_TAG

EXAMPLE = REPO / "examples" / "train.yaml"
RANK0 = RankLabels(training_job="j", node="n", rank=0, local_rank=0)


def f32(value: float) -> float:
    return float(np.float32(value))


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one tag as TensorBoard shows it, every event file of the folder read in order."""
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    if tag not in accumulator.Tags()["scalars"]:
        return []
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def step_line(loss: float, **extra: float) -> dict:
    return {"loss": loss, "lr": 1e-3, "grad_norm": 0.5, "step_seconds": 0.5, "text_tokens": 90, **extra}


# ------------------------------------------------------------------------------------------------ the sink


def test_values_the_jsonl_writes_as_null_are_left_out_and_checkpoint_lines_write_nothing(tmp_path):
    telemetry = RankTelemetry(TelemetryConfig(enabled=False, tensorboard=True), RANK0, run_dir=tmp_path)
    log_dir = tmp_path / TENSORBOARD_DIR
    telemetry.log_checkpoint("load", 0.1, 0)
    assert not log_dir.exists()  # the writer opens at the first step, not for a checkpoint timing
    telemetry.start_step(0)
    telemetry.end_step(
        loss=math.nan, text_tokens=60, vision_tokens=30, mfu=0.25, extra={"grad_norm": math.inf}
    )
    telemetry.start_step(1)
    telemetry.end_step(loss=2.5, text_tokens=60, extra={"lr": 3e-4, "grad_norm": 1.25})
    telemetry.close()

    lines = [line for line in read_jsonl(tmp_path / "metrics-rank0.jsonl") if "step_seconds" in line]
    assert lines[0]["loss"] is None and lines[0]["grad_norm"] is None
    assert scalars(log_dir, "train/loss") == [(1, 2.5)]
    assert scalars(log_dir, "train/grad_norm") == [(1, 1.25)]
    assert scalars(log_dir, "train/learning_rate") == [(1, f32(3e-4))]
    assert scalars(log_dir, "train/mfu") == [(0, 0.25)]
    tokens = [
        (line["step"], f32((line["text_tokens"] + line["vision_tokens"]) / line["step_seconds"]))
        for line in lines
    ]
    assert scalars(log_dir, TOKENS_PER_SECOND_TAG) == tokens
    (sink,) = [s for s in telemetry.sinks if isinstance(s, TensorBoardSink)]
    with pytest.raises(RuntimeError, match="sink is closed"):
        sink.log(step_line(1.0), 2)


def test_a_resumed_run_keeps_earlier_files_and_redone_steps_replace_the_old_points(tmp_path):
    log_dir = tmp_path / TENSORBOARD_DIR
    first = TensorBoardSink(log_dir)
    for step in range(5):
        first.log(step_line(10.0 + step), step)
    first.close()
    (earlier,) = log_dir.iterdir()
    written = earlier.read_bytes()

    # The next attempt is another process, started seconds later. Here it is this process: wait for the next
    # second, or the two file names could order by a per-process counter (…9 after …10) instead of by time.
    time.sleep(1.05 - time.time() % 1)
    second = TensorBoardSink(log_dir)
    second.log({"checkpoint_seconds/load": 0.2}, 0)  # logged at step 0 whatever step was loaded: no purge
    second.log(
        step_line(22.0), 2
    )  # resumed from the step-2 checkpoint: steps 2-4 of the first attempt are void
    second.log(step_line(23.0), 3)
    second.log(step_line(33.0), 3)  # in-place recovery back to step 3, in the same process
    second.close()

    assert earlier.read_bytes() == written  # untouched; the new attempt wrote a file of its own
    assert len(list(log_dir.iterdir())) == 2
    assert scalars(log_dir, "train/loss") == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 33.0)]
    assert [step for step, _ in scalars(log_dir, "train/learning_rate")] == [0, 1, 2, 3]


def test_only_global_rank_0_writes_and_only_when_asked(tmp_path):
    for rank, tensorboard in ((1, True), (0, False)):
        labels = RankLabels(training_job="j", node="n", rank=rank, local_rank=0)
        run_dir = tmp_path / f"rank{rank}-{tensorboard}"
        telemetry = RankTelemetry(
            TelemetryConfig(enabled=False, tensorboard=tensorboard), labels, run_dir=run_dir
        )
        telemetry.start_step(0)
        telemetry.end_step(loss=1.0)
        telemetry.close()
        assert not any(isinstance(s, TensorBoardSink) for s in telemetry.sinks)
        assert not (run_dir / TENSORBOARD_DIR).exists()


def test_the_option_is_off_by_default_and_a_bad_value_is_a_one_line_error_naming_it():
    assert load_training_config(str(EXAMPLE)).telemetry.tensorboard is False
    assert load_training_config(str(EXAMPLE), ["telemetry.tensorboard=true"]).telemetry.tensorboard is True
    with pytest.raises(ConfigError) as err:
        load_training_config(str(EXAMPLE), ["telemetry.tensorboard=sometimes"])
    assert "telemetry.tensorboard: Input should be a valid boolean" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="telemetry.tensorboard: must be true or false, got 'false'"):
        TelemetryConfig(tensorboard="false")


# ------------------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_tensorboard_reads_the_loss_curve_of_a_finished_run(tmp_path):
    """A tiny single-process training (3 steps of the `mini` model, about 10 s on an idle core): TensorBoard's
    reader gets the same steps and, at float32 precision, the same values as metrics-rank0.jsonl."""
    run_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "train.yaml",
        make_data(tmp_path / "synthetic"),
        run_dir,
        training={"steps": 3, "warmup_steps": 1},
        checkpoint={"interval_steps": 1000},  # only the final save
        parallel={"zero_stage": 0},
        telemetry={"enabled": False, "tensorboard": True},
    )
    raw = yaml.safe_load(config.read_text())
    raw["data"].update(rows_per_step=2, row_len=128)  # the harness sets the data section; smaller steps here
    config.write_text(yaml.safe_dump(raw))
    # `python -m trainer.train` alone is a world of one: no torchrun, whose launcher costs seconds.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.train", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # generous: both cores may be busy with other tests
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    lines = [line for line in read_jsonl(run_dir / "metrics-rank0.jsonl") if "step_seconds" in line]
    assert [line["step"] for line in lines] == [0, 1, 2]
    log_dir = run_dir / TENSORBOARD_DIR
    assert scalars(log_dir, "train/loss") == [(line["step"], f32(line["loss"])) for line in lines]
    for key, tag in TENSORBOARD_TAGS.items():
        expected = [(line["step"], f32(line[key])) for line in lines if line.get(key) is not None]
        assert expected and scalars(log_dir, tag) == expected, tag
    tokens = [line["text_tokens"] + line["vision_tokens"] for line in lines]
    assert scalars(log_dir, TOKENS_PER_SECOND_TAG) == [
        (line["step"], f32(n / line["step_seconds"])) for line, n in zip(lines, tokens, strict=True)
    ]
