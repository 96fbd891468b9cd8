"""The training configuration: one typed, validated schema shared by the trainer, the controller and the CLI.

torch-free (pydantic only), so the controller validates a job's training section without importing the trainer,
and the same model later becomes part of the Kubernetes CRD schema. Errors carry the field's dotted path.

`python -m trainer.train CONFIG [key.path=value ...]` reads a YAML or JSON file of this shape; overrides are
parsed as YAML scalars (`training.lr=3e-4`, `parallel.dp=2`, `data.paths=[a.jsonl,b.jsonl]`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .model_tool import MODEL_PRESETS as MODEL_PRESET_NAMES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = Field(
        "demo", description=f"a preset ({', '.join(MODEL_PRESET_NAMES)}) or a Hugging Face checkpoint dir"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16 on GPU, float32 on CPU")
    checkpoint_vision: bool = Field(False, description="recompute ViT block activations in backward")
    checkpoint_text_layers: list[int] | Literal["all"] = Field(
        default_factory=list, description="decoder layers whose activations are recomputed in backward"
    )

    @property
    def is_preset(self) -> bool:
        return self.name.lower() in MODEL_PRESET_NAMES

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        # A bare word must be a preset; anything path-like is a checkpoint the trainer opens (it may only exist
        # inside the training pod, so the control plane does not look for it).
        if name.lower() not in MODEL_PRESET_NAMES and "/" not in name and not name.startswith("."):
            raise ValueError(
                f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESET_NAMES)} or give a "
                "checkpoint path"
            )
        return name


class DataSection(_Section):
    paths: list[str] = Field(default_factory=list, description="JSONL sample files (local paths or URLs)")
    corpora: list[str] = Field(default_factory=list, description="tokenized mmap text corpora (prefixes)")
    tokenizer: str | None = Field(None, description="a tokenizer directory; None: the builtin Qwen2-VL one")
    row_len: int = Field(2048, ge=16, description="tokens per packed row")
    rows_per_step: int = Field(8, ge=1, description="global batch, in rows, over all data-parallel ranks")
    micro_batch_rows: int = Field(1, ge=1, description="rows per micro-batch on each rank")
    max_vision_tokens_per_row: int | None = Field(None, ge=1)
    image_min_pixels: int = Field(3136, ge=0)
    image_max_pixels: int = Field(12845056, ge=784)
    max_video_tokens: int = Field(16384, ge=1)
    num_workers: int = Field(2, ge=0)
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    cache_dir: str = Field(".cache/vlctl-data", description="cost index and decoded-video cache")
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {s3: {endpoint_url: ...}}; "
        "credentials come from the environment, never from here",
    )
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sources(self) -> DataSection:
        if not self.paths and not self.corpora:
            raise ValueError("give data.paths (JSONL files) or data.corpora (text corpora)")
        return self


class TrainingSection(_Section):
    stage: Literal[1, 2, 3] = Field(
        2, description="1: train ViT and merger (LLM frozen); 2: everything; 3: merger and LLM (ViT frozen)"
    )
    steps: int = Field(100, ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0, description="global gradient-norm clip; None: off")
    seed: int = Field(0, ge=0)
    vision_bag_weight: float = Field(
        0.0,
        ge=0,
        description="weight of a loss on each image and video's pooled features predicting its sample's answer "
        "tokens (a direct signal for a vision encoder trained from scratch); 0: off; needs parallel.pp = 1",
    )
    vision_bag_steps: int | None = Field(
        None, ge=1, description="add the vision bag loss for the first N steps only; None: every step"
    )

    @model_validator(mode="after")
    def _schedule(self) -> TrainingSection:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        return self


class ParallelSection(_Section):
    dp: int = Field(1, ge=1, description="data-parallel ranks")
    tp: int = Field(1, ge=1, description="tensor-parallel ranks (attention heads, MLP)")
    pp: int = Field(1, ge=1, description="pipeline stages (1F1B)")
    zero_stage: Literal[0, 1] = Field(1, description="1: optimizer states partitioned over dp (DeepSpeed)")
    first_stage_layers: int | None = Field(
        None, ge=0, description="decoder layers on pipeline stage 0 beside the ViT; None: balance by cost"
    )

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp


class CheckpointSection(_Section):
    dir: str = Field(
        "checkpoints", description="local folder or object-store URL, relative to the run folder"
    )
    interval_steps: int = Field(50, ge=1)
    keep_last: int = Field(3, ge=1)
    async_save: bool = True
    resume: Literal["latest", "none"] = Field("latest", description="resume from the newest valid checkpoint")
    resume_step: int | None = Field(
        None, ge=0, description="resume from this step's checkpoint instead of the newest (it must be valid)"
    )
    storage_outage_seconds: float = Field(
        600.0,
        ge=0,
        allow_inf_nan=False,
        description="how long training goes on while saves fail because the checkpoint storage cannot be "
        "written (permissions, read-only, full, I/O errors), retrying with backoff; then the run exits with "
        "code 74 naming the path. 0: exit at the first such failure",
    )


class RecoverySection(_Section):
    """In-place recovery (trainer/recovery/), used when the launcher starts the job with a recovery store."""

    snapshot_interval_steps: int = Field(
        1,
        ge=1,
        description="an in-memory snapshot of every rank's state (and its replica on a peer) every N steps",
    )
    regroup_timeout_seconds: float = Field(
        300.0,
        gt=0,
        allow_inf_nan=False,
        description="how long the survivors of a failure wait for their replacement before they give up (the "
        "job then restarts from the disk checkpoint)",
    )


class TelemetrySection(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    base_port: int = Field(
        0, ge=0, le=65535, description="rank endpoint port = base_port + local rank; 0: any"
    )
    peak_flops: float | None = Field(None, gt=0, description="per device, for MFU; None: by device type")
    tensorboard: bool = Field(
        False,
        description="rank 0 also writes loss, learning rate, grad norm, tokens/s and MFU as TensorBoard event "
        "files under <run_dir>/tensorboard/",
    )


class TrainingConfig(_Section):
    run_dir: str = Field("runs/train", description="logs, metrics and (by default) checkpoints")
    job_name: str = Field("local", description="the training_job label on every metric")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    recovery: RecoverySection = Field(default_factory=RecoverySection)

    @model_validator(mode="after")
    def _batch(self) -> TrainingConfig:
        if self.training.vision_bag_weight and self.parallel.pp > 1:
            raise ValueError(
                "training.vision_bag_weight: the vision bag loss needs parallel.pp = 1 (it is added on the last "
                f"stage), got pp = {self.parallel.pp}"
            )
        dp, rows = self.parallel.dp, self.data.rows_per_step
        if rows % dp:
            raise ValueError(f"data.rows_per_step ({rows}) must be divisible by parallel.dp ({dp})")
        if (rows // dp) % self.data.micro_batch_rows:
            raise ValueError(
                f"data.micro_batch_rows ({self.data.micro_batch_rows}) must divide the rows per "
                f"rank and step ({rows // dp})"
            )
        return self


class ConfigError(ValueError):
    """An invalid training configuration; the message names the field path."""


def _format(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where + ': ' if where else ''}{message}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as a YAML scalar or flow list)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_training_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainingConfig:
    """Read YAML/JSON, apply overrides, validate. Any problem is one ConfigError naming the file and field."""
    import yaml

    raw: dict[str, Any] = {}
    source = path or "config"
    if path:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
        try:
            raw = (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(
                f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                f"{str(err).splitlines()[0]}"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        keys, value = parse_override(override)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {key} is not a section")
        node[keys[-1]] = value
    try:
        return TrainingConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None
