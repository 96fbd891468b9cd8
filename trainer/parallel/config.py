"""Typed configuration of the parallel engine: optimizer and learning-rate schedule, training stage, pipeline
split, activation checkpointing, precision.

- Learning rate: linear warm-up to `lr` over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`
  (constant after warm-up when `total_steps` is None). It is a pure function of the step, so the scheduler's
  whole state is the step count.
- Training stages (Qwen2-VL's recipe): 1 trains the vision encoder and merger with the LLM frozen; 2 trains
  everything; 3 freezes the vision encoder (patch embedding and blocks) and trains the merger and the LLM.
  Frozen parameters get no gradient and no optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

TRAINING_STAGES = {
    1: "vision encoder and merger (LLM frozen)",
    2: "everything",
    3: "merger and LLM (vision encoder frozen)",
}
PRECISIONS = ("auto", "fp32", "bf16")


def micro_batches_per_step(*, rows_per_step: int, dp: int, micro_batch_rows: int) -> int:
    """Gradient-accumulation steps per rank that keep the global batch at `rows_per_step` rows for any dp."""
    if rows_per_step % (dp * micro_batch_rows):
        raise ValueError(
            f"rows_per_step: {rows_per_step} is not divisible by dp * micro_batch_rows = {dp} * {micro_batch_rows}"
        )
    return rows_per_step // (dp * micro_batch_rows)


def is_trainable(name: str, training_stage: int) -> bool:
    """Whether the parameter of this full name trains in the given stage."""
    if training_stage == 1:
        return name.startswith("visual.")
    if training_stage == 3:
        return not name.startswith(("visual.patch_embed.", "visual.blocks."))
    return True


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 0.0  # reached at total_steps
    warmup_steps: int = 0
    total_steps: int | None = None  # end of the cosine; None: constant lr after warm-up
    weight_decay: float = 0.0  # AdamW, on matrices only (norms and biases never decay)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr: must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"optimizer.total_steps: must exceed warmup_steps ({self.warmup_steps}), got {self.total_steps}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas: must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps: must be positive, got {self.eps}")
        if self.grad_clip < 0:
            raise ValueError(f"optimizer.grad_clip: must be >= 0, got {self.grad_clip}")

    def lr_at(self, step: int) -> float:
        """Learning rate of the update made at `step` (0 for the first)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training_stage: int = 2  # see TRAINING_STAGES
    micro_batch_rows: int = 1  # rows per micro-batch on each data-parallel rank
    num_micro_batches: int = 1  # micro-batches per step on each rank: rows_per_step / (dp * micro_batch_rows)
    first_stage_layers: int | None = (
        None  # decoder layers on pipeline stage 0; None: balance the estimated cost
    )
    vision_token_fraction: float = 0.5  # for that estimate: share of row tokens that are vision tokens
    supervised_fraction: float = 0.25  # and share with a label
    checkpoint_vision: bool | tuple[int, ...] = (
        False  # ViT blocks to recompute in backward (all, none, indices)
    )
    checkpoint_text: bool | tuple[int, ...] = False  # decoder layers likewise (indices of the full model)
    precision: str = "auto"  # auto: bf16 weights on GPU, fp32 on CPU
    check_replicated_every: int = 0  # verify tp-replicated weights bitwise equal every N steps; 0: never
    vision_bag_weight: float = 0.0  # weight of the vision bag-of-answer-tokens loss (vision_bag.py); 0: off
    vision_bag_steps: int | None = None  # add it for the first N updates only; None: every update

    def __post_init__(self) -> None:
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(
                f"training_stage: must be one of {sorted(TRAINING_STAGES)}, got {self.training_stage}"
            )
        for name in ("micro_batch_rows", "num_micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.first_stage_layers is not None and self.first_stage_layers < 0:
            raise ValueError(f"first_stage_layers: must be >= 0, got {self.first_stage_layers}")
        for name in ("vision_token_fraction", "supervised_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("checkpoint_vision", "checkpoint_text"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                value = tuple(int(i) for i in value)
                if any(i < 0 for i in value):
                    raise ValueError(f"{name}: block indices must be >= 0, got {value}")
                setattr(self, name, value)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.check_replicated_every < 0:
            raise ValueError(f"check_replicated_every: must be >= 0, got {self.check_replicated_every}")
