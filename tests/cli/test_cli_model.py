"""`vlctl --version` and `vlctl model ...`, driven through typer's CliRunner and as a real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("vlctl ")


def test_model_info_json_is_parseable_and_exact():
    result = runner.invoke(app, ["model", "info", "7b", "--output", "json", "--zero-shards", "8"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["total"] == 8_291_375_616 and not info["tied_embeddings"]
    bf16 = next(m for m in info["memory"] if m["dtype"] == "bfloat16")
    assert bf16["weights"] == 2 * info["total"]
    assert bf16["optimizer"] == 12 * info["total"] // 8


def test_model_info_table():
    result = runner.invoke(app, ["model", "info", "2b"])
    assert result.exit_code == 0
    assert "2,208,985,600" in result.stdout and "vision.blocks" in result.stdout


def test_unknown_preset_is_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "model", "info", "nope"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: model: unknown preset 'nope'; choose one of 2b, 7b, 72b, demo, tiny, mini"
    ]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model with the real tokenizer's vocabulary and token ids, saved in the Hugging Face format."""
    from trainer.models.qwen2_vl import Qwen2VL, save_pretrained
    from trainer.models.qwen2_vl.config import Qwen2VLConfig, tiny_config

    small = tiny_config()
    small.text.vocab_size = 151936
    cfg = Qwen2VLConfig(vision=small.vision, text=small.text, torch_dtype="float32")
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(Qwen2VL(cfg), path)
    return path


def test_model_generate_answers_about_an_image(checkpoint, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    result = runner.invoke(
        app,
        [
            "model",
            "generate",
            str(checkpoint),
            "--image",
            str(image),
            "--prompt",
            "What colour is this?",
            "--max-new-tokens",
            "5",
            "--output",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["new_tokens"] <= 5 and answer["image_grid_thw"] == [1, 4, 4]
    assert isinstance(answer["text"], str)


def test_model_generate_missing_image_names_it(checkpoint, tmp_path):
    result = runner.invoke(
        app, ["model", "generate", str(checkpoint), "--image", str(tmp_path / "none.png"), "--prompt", "hi"]
    )
    assert result.exit_code == 2
    assert "none.png" in result.output


def test_model_info_of_checkpoint_dir(checkpoint):
    result = runner.invoke(app, ["model", "info", str(checkpoint), "-o", "json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["total"] > 0
