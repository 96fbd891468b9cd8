"""trainer.evaluate: scoring of hand-made answers, the chance baselines, the loss curve, the prompt, and one tiny
run trained by `python -m trainer.train` and evaluated through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from trainer import evaluate as ev
from trainer.data import synthetic
from trainer.data.chat import IGNORE_INDEX
from trainer.data.formats import iter_jsonl
from trainer.data.grounding import format_box

REPO = Path(__file__).resolve().parents[2]
CFG = ev.EvalConfig(data=["val.jsonl"])


# ---------------------------------------------------------------------------------------------------- scoring


def test_grounding_answers_are_scored_by_iou_of_the_first_box():
    truth = [100, 100, 300, 300]
    exact = format_box(truth, "the red square")
    assert ev.grounding_iou(exact, truth) == 1.0
    assert ev.score("grounding", exact, {"box": truth}, CFG)["hit"]
    # Shifted by half its width: IoU 1/3, a miss; a second, perfect box later in the answer does not count.
    shifted = format_box([200, 100, 400, 300]) + " or " + format_box(truth)
    assert ev.grounding_iou(shifted, truth) == pytest.approx(1 / 3)
    assert not ev.score("grounding", shifted, {"box": truth}, CFG)["hit"]
    # IoU exactly at the threshold is not above it.
    half = format_box([100, 100, 300, 200])
    assert ev.grounding_iou(half, truth) == 0.5
    assert not ev.score("grounding", half, {"box": truth}, CFG)["hit"]
    # Slightly off is still a hit; no parseable box is a miss with nothing parsed.
    assert ev.score("grounding", format_box([110, 90, 310, 290]), {"box": truth}, CFG)["hit"]
    broken = ev.score("grounding", "<|box_start|>(66,6,666)<|box_end|>", {"box": truth}, CFG)
    assert broken == {"truth": truth, "parsed": None, "iou": None, "hit": False}


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [("left", "left"), ("It moves Up.", "up"), ("down, not left", "down"), ("leftover", None), ("", None)],
)
def test_direction_answers_take_the_first_direction_word(reply, parsed):
    assert ev.answer_direction(reply) == parsed
    assert ev.score("direction", reply, {"direction": "up"}, CFG)["hit"] == (parsed == "up")


def test_binomial_tail():
    assert ev.binomial_tail(0, 10, 0.3) == 1.0
    assert ev.binomial_tail(4, 4, 0.25) == pytest.approx(0.25**4)
    assert ev.binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # 3/8 + 1/8
    tails = [ev.binomial_tail(k, 40, 0.3) for k in range(41)]
    assert all(a >= b for a, b in zip(tails, tails[1:], strict=False))


# ---------------------------------------------------------------------------------------------------- chance


def test_box_baselines_of_identical_boxes_are_perfect():
    boxes = [[100, 200, 300, 400]] * 3
    base = ev.box_baselines(boxes, grid=20)
    assert base["best_constant_box"] == {"box": [100, 200, 300, 400], "hits": 3, "accuracy": 1.0}
    assert base["mean_box"]["accuracy"] == 1.0
    assert base["another_samples_box"]["accuracy"] == 1.0


def test_box_baselines_of_disjoint_boxes():
    boxes = [[0, 0, 200, 200], [600, 600, 800, 800]]
    base = ev.box_baselines(boxes, grid=20)
    assert base["best_constant_box"]["hits"] == 1  # no single box overlaps both by more than half
    assert base["mean_box"] == {"box": [300, 300, 500, 500], "hits": 0, "accuracy": 0.0}
    assert base["another_samples_box"]["accuracy"] == 0.0


def test_best_constant_box_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(0)
    corners = rng.integers(0, 1000, size=(12, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], 1)  # (x1, y1, x2, y2)
    boxes = [[int(b[0]), int(b[1]), int(b[2]), int(b[3])] for b in boxes]
    grid = 100
    edges = range(0, 1000, grid)
    best = max(
        sum(ev.box_iou((x1, y1, x2, y2), b) > 0.5 for b in boxes)
        for x1 in edges
        for x2 in edges
        if x2 > x1
        for y1 in edges
        for y2 in edges
        if y2 > y1
    )
    assert ev.box_baselines(boxes, grid=grid)["best_constant_box"]["hits"] == best


def test_summaries_count_hits_and_use_the_best_constant_answer_as_chance():
    rows = [{"truth": d, "parsed": p, "hit": d == p} for d, p in [("up", "up"), ("up", "up"), ("left", None)]]
    out = ev.summarize("direction", rows, CFG)
    assert (out["n"], out["hits"], out["unparsed"]) == (3, 2, 1)
    assert out["baselines"]["majority"] == {"answer": "up", "hits": 2, "accuracy": 2 / 3}
    assert out["chance"] == pytest.approx(2 / 3)
    assert out["p_value"] == pytest.approx(ev.binomial_tail(2, 3, 2 / 3))
    assert out["per_direction"]["up"] == {"n": 2, "hits": 2}
    box = [0, 0, 500, 500]
    grounding = ev.summarize("grounding", [{"truth": box, "parsed": box, "iou": 1.0, "hit": True}], CFG)
    assert (grounding["hits"], grounding["mean_iou"], grounding["chance"]) == (1, 1.0, 1.0)
    assert ev.summarize("grounding", [], CFG)["accuracy"] is None


# ---------------------------------------------------------------------------------------------------- loss curve


def test_loss_curve_keeps_the_last_record_of_a_step(tmp_path):
    records = [{"step": s, "loss": 10.0 - s, "step_seconds": 2.0} for s in range(8)]
    records.insert(3, {"step": 8, "checkpoint_seconds/stage": 0.1})  # no loss: ignored
    records.append({"step": 7, "loss": 2.5, "step_seconds": 2.0})  # re-run after a resume
    path = tmp_path / "metrics-rank0.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    curve = ev.loss_curve(path)
    assert (curve["steps"], curve["first"], curve["last"], curve["min"]) == (8, 10.0, 2.5, 2.5)
    assert curve["first_5_mean"] == pytest.approx(8.0)
    assert curve["last_5_mean"] == pytest.approx((7 + 6 + 5 + 4 + 2.5) / 5)
    assert curve["train_seconds"] == 16.0
    assert curve["curve"][-1] == [7, 2.5]
    path.write_text(json.dumps({"step": 1, "time": 0}) + "\n")
    with pytest.raises(ValueError, match="no step records with a loss"):
        ev.loss_curve(path)


def test_config_errors_name_the_field():
    for kwargs, field in [
        ({"data": []}, "data"),
        ({"data": ["v"], "max_samples": 0}, "max_samples"),
        ({"data": ["v"], "iou_threshold": 1.0}, "iou_threshold"),
    ]:
        with pytest.raises(ValueError, match=field):
            ev.EvalConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(str(root), seed=0, num_images=4, num_videos=4, num_texts=0, val_fraction=0.5)
    return root


def test_the_prompt_is_the_training_encoding_up_to_the_answer(dataset):
    from trainer.data.image import ImageProcessorConfig
    from trainer.data.tokenizer import load_tokenizer
    from trainer.data.video import VideoConfig

    for file in ("grounding.jsonl", "video_qa.jsonl"):
        sample = next(iter_jsonl(dataset / "val" / file))
        ids, encoded = ev.build_prompt(
            sample, tokenizer=load_tokenizer(None), image_cfg=ImageProcessorConfig(), video_cfg=VideoConfig()
        )
        first_answer_token = int(np.argmax(encoded.labels != IGNORE_INDEX))
        assert ids == encoded.input_ids[:first_answer_token].tolist()


def test_a_tiny_run_is_evaluated_from_its_run_folder(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    config = {
        "run_dir": str(run),
        "model": {"name": "mini"},
        "data": {
            "paths": [str(dataset / "train" / "grounding.jsonl"), str(dataset / "train" / "video_qa.jsonl")],
            "row_len": 256,
            "rows_per_step": 2,
            "micro_batch_rows": 2,
            "num_workers": 0,
            "cache_dir": str(tmp_path / "cache"),
        },
        "training": {"steps": 2, "lr": 1e-3, "warmup_steps": 1},
        "checkpoint": {"interval_steps": 2},
        "telemetry": {"enabled": False},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "trainer.train", str(tmp_path / "train.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    # The run folder, its checkpoint root and the step folder name the same step and the same metrics.
    step = ev.resolve_source(str(run))
    assert step.step == 2 and step.metrics == run / "metrics-rank0.jsonl"
    for other in (run / "checkpoints", Path(step.path)):
        same = ev.resolve_source(str(other))
        assert (same.path, same.metrics) == (step.path, step.metrics)

    val = [str(dataset / "val" / "grounding.jsonl"), str(dataset / "val" / "video_qa.jsonl")]
    answers = tmp_path / "answers.jsonl"
    argv = [
        str(run),
        "--data",
        *val,
        "--max-samples",
        "1",
        "--max-new-tokens",
        "4",
        "--answers",
        str(answers),
    ]
    assert ev.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2
    assert report["grounding"]["n"] == 1 and report["direction"]["n"] == 1
    assert report["loss"]["steps"] == 2 and math.isfinite(report["loss"]["last"])
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["grounding", "direction"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert ev.main([str(tmp_path), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "val.jsonl").write_text("")
    assert ev.main([str(tmp_path), "--data", str(tmp_path / "val.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "neither a Hugging Face folder nor a run" in err and err.count("\n") == 1
