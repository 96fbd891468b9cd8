"""The training config schema: files, overrides, and one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.contract.training import ConfigError, load_training_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train.yaml"


def test_example_config_and_overrides():
    config = load_training_config(str(EXAMPLE), ["parallel.dp=2", "training.lr=3e-4", "data.paths=[a.jsonl]"])
    assert config.parallel.dp == 2 and config.training.lr == 3e-4 and config.data.paths == ["a.jsonl"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=huge"], "model.name: unknown preset 'huge'"),
        (["parallel.dp=3"], "data.rows_per_step (4) must be divisible by parallel.dp (3)"),
        (["training.lr=-1"], "training.lr: Input should be greater than 0"),
        (["training.warmup_steps=500"], "warmup_steps (500) must not exceed steps (100)"),
        (["data.row_len=four"], "data.row_len: Input should be a valid integer"),
        (["training.stage=4"], "training.stage: Input should be 1, 2 or 3"),
        (["nonsense"], "expected key.path=value"),
        (
            ["training.vision_bag_weight=1", "parallel.pp=2", "data.rows_per_step=4"],
            "training.vision_bag_weight: the vision bag loss needs parallel.pp = 1",
        ),
        (
            ["training.vision_bag_steps=0"],
            "training.vision_bag_steps: Input should be greater than or equal to 1",
        ),
    ],
)
def test_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_training_config(str(EXAMPLE), overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unreadable_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_training_config(str(tmp_path / "nope.yaml"))
