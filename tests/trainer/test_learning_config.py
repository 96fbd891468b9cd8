"""examples/learning.yaml (the config behind docs/learning.md) stays valid as the schema changes."""

from __future__ import annotations

from pathlib import Path

from trainer.contract.training import load_training_config

LEARNING = Path(__file__).resolve().parents[2] / "examples" / "learning.yaml"


def test_learning_config_loads_single_process_on_cpu():
    config = load_training_config(str(LEARNING))
    assert config.model.name == "mini" and config.model.dtype == "float32"
    assert config.parallel.world_size == 1
    # The docs' commands write the synthetic data under runs/learn/data; the config must read that split.
    assert config.data.paths and all(p.startswith("runs/learn/data/train/") for p in config.data.paths)
    assert config.training.warmup_steps < config.training.steps
    # The vision bag loss is what lets the random vision encoder learn motion in this budget (docs/learning.md).
    assert config.training.vision_bag_weight > 0 and config.parallel.pp == 1
