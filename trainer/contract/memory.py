"""A per-rank memory estimate for a training configuration, made before anything runs (torch-free).

`estimate_rank_memory(config)` is what the control plane checks a job against at submit: a rank that cannot fit
is refused there, instead of growing until the machine swaps or the start-up timeout ends it. It counts what
the trainer certainly allocates and leaves out what depends on the data, so it is meant to err low (a refusal
should mean the job could not have fit); no test yet compares it with a rank's measured peak memory:

- model state (CPU ranks only; on GPU ranks it lives on the device): weights, gradients of the trainable
  parameters of the stage, Adam's two moments (plus an fp32 master copy for bfloat16 weights), divided over the
  data-parallel ranks under ZeRO-1, with the parameters split evenly over tp x pp. Presets only: a checkpoint
  directory's size is not known before the trainer opens it, so it counts zero;
- activations of one micro-batch's decoder layers (CPU ranks only): per token and layer the saved inputs of the
  norms, attention and MLP projections (4 x hidden + 4 x intermediate values; only the layer input for
  recomputed layers), times the micro-batches a pipeline stage holds at once (up to pp), plus the logits of the
  last stage (tokens x vocabulary). Vision-tower activations depend on the images and are not counted;
- the step's batches, on the host in every case: `trainer.runtime.Run.train_step` draws all of a step's
  micro-batches from the loader before running them, so every row of the rank's step (rows_per_step / dp) is
  held at once, plus the loader's prefetch (num_workers x prefetch micro-batches). Each packed row holds three
  int64 arrays of row_len (input ids, labels, segment ids; `trainer.data.rows.pack_row`). Pixels and video
  frames depend on the data and are not counted;
- the step's row index: `RowStream.rank_rows` lists a Position tuple per row of the rank's step;
- a fixed floor for the Python interpreter with torch imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .training import TrainingConfig

GiB = 1024**3
MiB = 1024**2
# Below a rank with its imports done: `import trainer.train` peaked at 307 MiB RSS here.
RUNTIME_BYTES = 256 * MiB
LOADER_PREFETCH = 2  # trainer.data.loader.LoaderConfig.prefetch (the trainer keeps the default)
TOKEN_ARRAYS = 3  # input_ids, labels, segment_ids: int64 each (trainer.data.rows.pack_row)
POSITION_BYTES = 64  # one Position(epoch, row) NamedTuple in the step's row list, at the least
_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class PresetShape:
    """What the estimate needs of a model preset (trainer.models.qwen2_vl.config.PRESETS; a test checks them)."""

    vision: int  # parameters: patch embedding and ViT blocks
    merger: int
    text: int  # embeddings, decoder layers, final norm, lm_head when untied
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    @property
    def total(self) -> int:
        return self.vision + self.merger + self.text


PRESET_SHAPES: dict[str, PresetShape] = {
    "2b": PresetShape(631183360, 34087936, 1543714304, 1536, 28, 8960, 151936),
    "7b": PresetShape(631183360, 44575744, 7615616512, 3584, 28, 18944, 152064),
    "72b": PresetShape(631183360, 68173312, 72706203648, 8192, 80, 29568, 152064),
    "demo": PresetShape(943616, 394240, 42045696, 256, 4, 768, 151936),
    "tiny": PresetShape(63040, 24832, 139840, 64, 2, 128, 512),
    "mini": PresetShape(63040, 24832, 19522112, 64, 2, 128, 151936),
}


@dataclass(frozen=True, slots=True)
class RankMemory:
    """Bytes one rank needs at the least (see the module docstring for what each part counts)."""

    model_state: int  # weights + gradients + optimizer
    activations: int
    step_batches: int
    row_index: int
    runtime: int = RUNTIME_BYTES
    snapshots: int = 0  # in-place recovery's host memory: SNAPSHOT_BUFFERS x `snapshot_bytes`

    @property
    def total(self) -> int:
        return (
            self.model_state
            + self.activations
            + self.step_batches
            + self.row_index
            + self.runtime
            + self.snapshots
        )

    @property
    def field(self) -> str:
        """The configuration field behind the largest part: the one to change."""
        parts = {
            "training.data.rows_per_step": self.step_batches + self.row_index,
            "training.data.micro_batch_rows": self.activations,
            "training.model.name": self.model_state,
            "fault_tolerance.recovery": self.snapshots,
        }
        return max(parts, key=parts.__getitem__)

    def describe(self) -> str:
        parts = [
            ("the step's rows", self.step_batches + self.row_index),
            ("model state", self.model_state),
            ("activations", self.activations),
            ("runtime", self.runtime),
            ("in-place snapshots", self.snapshots),
        ]
        return ", ".join(f"{name} {human_bytes(n)}" for name, n in parts if n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def training_memory(
    num_params: int, *, param_dtype: str = "bfloat16", trainable: int | None = None, zero_shards: int = 1
) -> dict[str, int]:
    """Bytes for weights, gradients and Adam state (fp32 master copy plus two moments when weights are half
    precision; two moments only in fp32). Optimizer state is divided over `zero_shards` ranks (ZeRO-1).
    Activations depend on batch shape and checkpointing and are not included."""
    trainable = num_params if trainable is None else trainable
    width = _WIDTH[param_dtype]
    optimizer_per_param = 8 + (4 if width < 4 else 0)
    return {
        "weights": num_params * width,
        "gradients": trainable * width,
        "optimizer": trainable * optimizer_per_param // zero_shards,
    }


# In-place recovery (trainer/recovery/snapshot.py): a rank holds its own snapshot and its peer's replica, each
# double-buffered so that a half-written one is never the only copy.
SNAPSHOT_BUFFERS = 4


def snapshot_bytes(
    num_params: int, *, param_dtype: str = "bfloat16", trainable: int | None = None, zero_shards: int = 1
) -> int:
    """One in-place snapshot of a rank: its ZeRO-1 share of the fp32 master weights and both Adam moments (12
    bytes a trainable parameter over `zero_shards`), and the frozen weights whole; the trained weights are left
    out (re-derived from the master copy: trainer/recovery/engine.py). Measured: 118 MB for `mini` under dp=2,
    as this gives."""
    trainable = num_params if trainable is None else trainable
    return trainable * 12 // zero_shards + (num_params - trainable) * _WIDTH[param_dtype]


def estimate_rank_memory(
    config: TrainingConfig, *, on_gpu: bool = False, in_place: bool = False
) -> RankMemory:
    """The least host memory one rank of `config` needs; `on_gpu`: model state and activations live on a device
    (in-place snapshots stay in host memory); `in_place`: in-place recovery's snapshots are counted."""
    data, p = config.data, config.parallel
    rows_per_rank = data.rows_per_step // p.dp
    in_flight_rows = data.num_workers * LOADER_PREFETCH * data.micro_batch_rows
    step_batches = (rows_per_rank + in_flight_rows) * TOKEN_ARRAYS * 8 * data.row_len
    row_index = rows_per_rank * POSITION_BYTES
    shape = PRESET_SHAPES.get(config.model.name.lower())
    if shape is None:
        return RankMemory(model_state=0, activations=0, step_batches=step_batches, row_index=row_index)
    trainable = {
        1: shape.vision + shape.merger,
        2: shape.total,
        3: shape.text + shape.merger,
    }[config.training.stage]
    snapshots = 0
    if in_place:
        one = snapshot_bytes(
            shape.total,
            param_dtype=config.model.dtype,
            trainable=trainable,
            zero_shards=p.dp if p.zero_stage == 1 else 1,
        )
        snapshots = SNAPSHOT_BUFFERS * one // (p.tp * p.pp)
    if on_gpu:
        return RankMemory(
            model_state=0, activations=0, step_batches=step_batches, row_index=row_index, snapshots=snapshots
        )
    state = training_memory(
        shape.total,
        param_dtype=config.model.dtype,
        trainable=trainable,
        zero_shards=p.dp if p.zero_stage == 1 else 1,
    )
    model_state = sum(state.values()) // (p.tp * p.pp)

    tokens = data.micro_batch_rows * data.row_len
    layers = -(-shape.layers // p.pp)  # on the fullest stage
    wanted = config.model.checkpoint_text_layers
    recomputed = shape.layers if wanted == "all" else len(set(wanted))
    recomputed = min(layers, recomputed * layers // shape.layers)
    per_token = (layers - recomputed) * (
        4 * shape.hidden + 4 * shape.intermediate
    ) // p.tp + recomputed * shape.hidden
    in_flight = min(p.pp, rows_per_rank // data.micro_batch_rows)
    logits = tokens * shape.vocab * 4 // p.tp  # the last stage's logits, in fp32 for the loss
    activations = tokens * per_token * _WIDTH[config.model.dtype] * in_flight + logits
    return RankMemory(
        model_state=model_state,
        activations=activations,
        step_batches=step_batches,
        row_index=row_index,
        snapshots=snapshots,
    )
