"""Qwen2-VL, weight-compatible with the released Hugging Face checkpoints (2B, 7B, 72B)."""

from .config import PRESETS, Qwen2VLConfig, TextConfig, VisionConfig, preset
from .generate import generate
from .model import ModelOutput, Qwen2VL
from .weights import CheckpointError, from_pretrained, load_config, save_pretrained

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ModelOutput",
    "Qwen2VL",
    "Qwen2VLConfig",
    "TextConfig",
    "VisionConfig",
    "from_pretrained",
    "generate",
    "load_config",
    "preset",
    "save_pretrained",
]
