"""Model FLOPs utilisation: the FLOPs a step's batches need, by formula, over what the devices could do.

Counting convention (model FLOPs, not hardware FLOPs):

- A weight of N parameters costs 2N FLOPs per input row forward and 4N backward (input and weight gradients):
  6N for a trained part. Biases and norm weights are counted like matrix weights (well under 1% of N), so N is
  just the parameter count.
- Attention costs 2·l·d FLOPs per query for the scores and 2·l·d for the weighted sum (l keys, d = heads x
  head_dim), forward; backward is twice that: 12·d·l per query per layer. The whole l x l matrix is counted,
  causal or not (the usual convention; a causal kernel does about half of it).
- Recomputed activations (checkpointing) and padding are not counted: they are not useful work.

One micro-batch: rows packing samples of real lengths l_i (padding excluded), T = sum l_i tokens:

    LLM     m_text * N_text * T          + a_text * layers * hidden * sum_i l_i^2
    ViT     m_vit * N_vit * P            + a_vit * depth * embed_dim * sum_j s_j^2
    merger  m_merger * N_merger * P / merge^2

- N_text = decoder layers + final norm + the output projection (vocab x hidden, a matmul, counted even when
  tied); the input embedding is a table lookup and is left out.
- P patches in all; a segment s_j is one temporal slice of one image or video (h x w patches), the unit the ViT
  attends within. N_vit = patch embedding + blocks; the merger runs once per merged token (P / 4).
- m = 6, a = 12 for a trained part. A frozen part that gradients still cross (a frozen LLM over a trained ViT)
  needs input gradients only: m = 4, a = 12. A frozen part with nothing trained below it runs forward only:
  m = 2, a = 4. Parts, bottom to top: vision, merger, text.

MFU = step FLOPs / (step seconds x peak FLOP/s per device x devices). A rank reports the MFU of its
data-parallel replica: the FLOPs of the micro-batches that replica processed, over its tensor x pipeline
devices (`model_parallel_size`); the mean over ranks is the job's MFU.

Peak FLOP/s come from `MfuConfig`, never guessed silently: `peak_flops` when set; otherwise `device` names a
row of `PEAK_FLOPS`; `auto` maps the CUDA device name onto it (an unknown GPU is an error) or picks `cpu`, and
the choice is logged. The `cpu` row is a round 1 TFLOP/s, about a many-core AVX-512 server in fp32: CPU runs
are smoke tests, and it only keeps their MFU finite and comparable; set `peak_flops` to measure a CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from trainer.models.qwen2_vl.config import Qwen2VLConfig

log = logging.getLogger("trainer.telemetry")

# Dense bf16 tensor-core peaks per device (vendor datasheets, without sparsity).
PEAK_FLOPS = {"h100": 989e12, "h100-pcie": 756e12, "h200": 989e12, "a100": 312e12, "cpu": 1e12}
PARTS = ("vision", "merger", "text")  # bottom to top


@dataclass(kw_only=True, slots=True)
class MfuConfig:
    device: str = "auto"  # auto, or a key of PEAK_FLOPS
    peak_flops: float | None = None  # FLOP/s per device; overrides device
    trainable: tuple[str, ...] = PARTS  # parts whose weights the optimizer updates

    def __post_init__(self) -> None:
        if self.device != "auto" and self.device not in PEAK_FLOPS:
            raise ValueError(
                f"mfu.device: expected auto or one of {', '.join(PEAK_FLOPS)}, got {self.device!r}"
            )
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"mfu.peak_flops: must be positive, got {self.peak_flops}")
        self.trainable = tuple(self.trainable)
        unknown = set(self.trainable) - set(PARTS)
        if unknown or not self.trainable:
            raise ValueError(f"mfu.trainable: expected a non-empty subset of {PARTS}, got {self.trainable}")


def resolve_peak_flops(config: MfuConfig) -> tuple[float, str]:
    """(FLOP/s per device, where the number came from); logged, since every MFU depends on it."""
    if config.peak_flops is not None:
        peak, source = config.peak_flops, "mfu.peak_flops"
    elif config.device != "auto":
        peak, source = PEAK_FLOPS[config.device], f"mfu.device={config.device}"
    else:
        device = _detect_device()
        peak, source = PEAK_FLOPS[device], f"detected {device}"
    log.info("MFU peak: %.0f TFLOP/s per device (%s)", peak / 1e12, source)
    return peak, source


def _detect_device() -> str:
    import torch  # here, not at the top: the rest of telemetry runs without torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    for key, marker in (("h100-pcie", "H100 PCIe"), ("h100", "H100"), ("h200", "H200"), ("a100", "A100")):
        if marker in name:
            return key
    raise ValueError(f"mfu.device: no peak FLOP/s known for GPU {name!r}; set mfu.peak_flops")


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What the FLOPs of one micro-batch depend on, and its token counts for telemetry."""

    sample_lengths: tuple[int, ...]  # real tokens of each sample, over all rows
    vision_grids: tuple[tuple[int, int, int], ...] = ()  # (t, h, w) patches per image, then per video
    vision_tokens: int = 0  # LLM positions fed by the vision encoder

    @property
    def tokens(self) -> int:
        return sum(self.sample_lengths)

    @property
    def text_tokens(self) -> int:
        return self.tokens - self.vision_tokens

    @classmethod
    def from_batch(cls, batch: Mapping[str, Any], *, image_token_id: int, video_token_id: int) -> BatchShape:
        """From collated arrays (numpy or torch): input_ids (B, L), segment_ids (B, L) with -1 on padding
        (without it each row is one sample), image_grid_thw / video_grid_thw (n, 3) when present."""
        ids = _np(batch["input_ids"])
        if ids.ndim != 2:
            raise ValueError(f"input_ids: expected (rows, length), got shape {ids.shape}")
        seg = _np(batch["segment_ids"]) if batch.get("segment_ids") is not None else np.zeros_like(ids)
        if seg.shape != ids.shape:
            raise ValueError(f"segment_ids: shape {seg.shape} differs from input_ids {ids.shape}")
        lengths = [int(n) for row in seg for n in np.bincount(row[row >= 0]) if n]
        vision = int((np.isin(ids, (image_token_id, video_token_id)) & (seg >= 0)).sum())
        grids = [
            tuple(int(v) for v in g)
            for name in ("image_grid_thw", "video_grid_thw")
            if batch.get(name) is not None
            for g in _np(batch[name]).reshape(-1, 3)
        ]
        return cls(sample_lengths=tuple(lengths), vision_grids=tuple(grids), vision_tokens=vision)


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on the GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def parameter_counts(cfg: Qwen2VLConfig) -> dict[str, int]:
    """Parameters by part from the config alone, keyed like `info.count_parameters` (no lm_head when tied)."""
    v, t = cfg.vision, cfg.text
    c, mlp, window = v.embed_dim, v.mlp_dim, v.embed_dim * v.spatial_merge_size**2
    d, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * mlp + mlp) + (mlp * c + c)
    layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * t.intermediate_size + 2 * d
    counts = {
        "vision.patch_embed": c * v.patch_dim,
        "vision.blocks": v.depth * block,
        "vision.merger": 2 * c + (window * window + window) + (window * v.hidden_size + v.hidden_size),
        "text.embed_tokens": t.vocab_size * d,
        "text.layers": t.num_hidden_layers * layer,
        "text.norm": d,
    }
    if not t.tie_word_embeddings:
        counts["text.lm_head"] = t.vocab_size * d
    return counts


@dataclass(frozen=True, slots=True)
class FlopsModel:
    """The formula's constants for one model config and set of trained parts."""

    text_params: int  # N_text
    text_layers: int
    text_width: int  # heads x head_dim
    vit_params: int  # N_vit
    vit_depth: int
    vit_width: int
    merger_params: int
    patches_per_token: int  # merge^2
    matmul: dict[str, int]  # m per part
    attention: dict[str, int]  # a per part

    @classmethod
    def from_config(cls, cfg: Qwen2VLConfig, *, trainable: tuple[str, ...] = PARTS) -> FlopsModel:
        n = parameter_counts(cfg)
        matmul, attention = {}, {}
        for i, part in enumerate(PARTS):
            if part in trainable:
                matmul[part], attention[part] = 6, 12
            elif any(p in trainable for p in PARTS[:i]):  # gradients cross it on their way down
                matmul[part], attention[part] = 4, 12
            else:
                matmul[part], attention[part] = 2, 4
        return cls(
            text_params=n["text.layers"] + n["text.norm"] + cfg.text.vocab_size * cfg.text.hidden_size,
            text_layers=cfg.text.num_hidden_layers,
            text_width=cfg.text.num_attention_heads * cfg.text.head_dim,
            vit_params=n["vision.patch_embed"] + n["vision.blocks"],
            vit_depth=cfg.vision.depth,
            vit_width=cfg.vision.embed_dim,
            merger_params=n["vision.merger"],
            patches_per_token=cfg.vision.spatial_merge_size**2,
            matmul=matmul,
            attention=attention,
        )

    def flops(self, shape: BatchShape) -> float:
        lengths = np.asarray(shape.sample_lengths, dtype=np.float64)
        text = self.matmul["text"] * self.text_params * lengths.sum()
        text += self.attention["text"] * self.text_layers * self.text_width * (lengths**2).sum()
        patches = sum(t * h * w for t, h, w in shape.vision_grids)
        segments_sq = sum(t * float(h * w) ** 2 for t, h, w in shape.vision_grids)
        vit = self.matmul["vision"] * self.vit_params * patches
        vit += self.attention["vision"] * self.vit_depth * self.vit_width * segments_sq
        merger = self.matmul["merger"] * self.merger_params * patches / self.patches_per_token
        return float(text + vit + merger)


def mfu(flops: float, seconds: float, *, peak_flops: float, devices: int = 1) -> float:
    if seconds <= 0:
        raise ValueError(f"seconds: must be positive, got {seconds}")
    if devices < 1:
        raise ValueError(f"devices: must be >= 1, got {devices}")
    return flops / (seconds * peak_flops * devices)


class MfuMeter:
    """FLOPs of a replica's micro-batches and the MFU of a step, for one model and device."""

    def __init__(
        self, model_cfg: Qwen2VLConfig, config: MfuConfig | None = None, *, model_parallel_size: int = 1
    ):
        config = config or MfuConfig()
        if model_parallel_size < 1:
            raise ValueError(f"model_parallel_size: must be >= 1, got {model_parallel_size}")
        self.model_cfg = model_cfg
        self.flops_model = FlopsModel.from_config(model_cfg, trainable=config.trainable)
        self.peak_flops, self.peak_source = resolve_peak_flops(config)
        self.devices = model_parallel_size

    def shape(self, batch: Mapping[str, Any]) -> BatchShape:
        cfg = self.model_cfg
        return BatchShape.from_batch(
            batch, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id
        )

    def flops(self, shape: BatchShape) -> float:
        return self.flops_model.flops(shape)

    def mfu(self, flops: float, seconds: float) -> float:
        return mfu(flops, seconds, peak_flops=self.peak_flops, devices=self.devices)
