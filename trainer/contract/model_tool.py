"""The `python -m trainer.model_tool` protocol behind `vlctl model ...`: JSON on stdout, one-line errors."""

from __future__ import annotations

from typing import TypedDict

MODEL_PRESETS = (
    "2b",
    "7b",
    "72b",
    "demo",
    "tiny",
    "mini",
)  # must equal trainer.models.qwen2_vl.config.PRESETS

# `python -m trainer.model_tool {info,generate,demo} ...` prints one JSON object on stdout; a user error prints one
# line on stderr and exits with EXIT_USER_ERROR.
MODEL_TOOL_MODULE = "trainer.model_tool"
EXIT_USER_ERROR = 2


class MemoryEstimate(TypedDict):
    dtype: str
    weights: int  # bytes
    gradients: int
    optimizer: int  # Adam states (and an fp32 master copy for half precision), per data-parallel rank


class ModelInfo(TypedDict):
    source: str  # preset name or checkpoint path
    parameters: dict[str, int]  # by part: vision.blocks, text.layers, ...
    total: int
    vision: int
    text: int
    tied_embeddings: bool
    memory: list[MemoryEstimate]


class GenerateResult(TypedDict):
    text: str
    prompt_tokens: int
    new_tokens: int
    image_grid_thw: list[int]
