"""Typed configuration of the Qwen2-VL model, the released presets and small ones for tests and the CPU demo.

Field names follow the Hugging Face config where one exists, so `weights.py` maps them one to one. The one
confusing name kept on purpose is `VisionConfig.hidden_size`: in the checkpoints it is the width the patch merger
projects to (the LLM width), while `embed_dim` is the ViT's own width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

# Special token ids of the Qwen2-VL tokenizer (the same for 2B, 7B and 72B).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass(kw_only=True, slots=True)
class VisionConfig:
    depth: int = 32  # transformer blocks
    embed_dim: int = 1280  # ViT width
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2  # frames per tube; a still image is two identical frames
    spatial_merge_size: int = 2  # the merger concatenates merge x merge neighbouring patches
    hidden_size: int = 1536  # merger output width = the LLM's hidden size
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in (
            "depth",
            "embed_dim",
            "num_heads",
            "in_channels",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "hidden_size",
        ):
            _require(getattr(self, name) > 0, f"vision.{name}", "must be positive")
        _require(self.embed_dim % self.num_heads == 0, "vision.num_heads", "must divide vision.embed_dim")
        # 2D rotary: half the head dim for rows, half for columns, each made of (cos, sin) pairs.
        _require(self.head_dim % 4 == 0, "vision.num_heads", "embed_dim / num_heads must be a multiple of 4")
        _require(self.mlp_ratio > 0, "vision.mlp_ratio", "must be positive")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (channels x frames x rows x columns): 1176 for the released models."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(kw_only=True, slots=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Rotary frequency pairs given to the temporal, height and width position rows; sums to head_dim / 2.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            _require(getattr(self, name) > 0, f"text.{name}", "must be positive")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            "text.num_attention_heads",
            "must divide text.hidden_size",
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "text.num_key_value_heads",
            "must divide text.num_attention_heads",
        )
        self.mrope_section = tuple(int(s) for s in self.mrope_section)  # type: ignore[assignment]
        _require(len(self.mrope_section) == 3, "text.mrope_section", "needs three entries (t, h, w)")
        _require(
            sum(self.mrope_section) * 2 == self.head_dim,
            "text.mrope_section",
            f"must sum to head_dim / 2 = {self.head_dim // 2}, got {sum(self.mrope_section)}",
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True, slots=True)
class Qwen2VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = IMAGE_PAD_ID
    video_token_id: int = VIDEO_PAD_ID
    vision_start_token_id: int = VISION_START_ID
    vision_end_token_id: int = VISION_END_ID
    bos_token_id: int = ENDOFTEXT_ID
    eos_token_id: int = IM_END_ID
    # The id that fills padded positions; None: the model has no pad token (then `fill_token_id` is eos). The
    # default is the real tokenizer's <|endoftext|>, so a small vocabulary must name its own or None.
    pad_token_id: int | None = ENDOFTEXT_ID
    torch_dtype: str = "bfloat16"  # dtype the weights are stored in; the model may run in another

    def __post_init__(self) -> None:
        _require(
            self.vision.hidden_size == self.text.hidden_size,
            "vision.hidden_size",
            f"must equal text.hidden_size ({self.text.hidden_size}), got {self.vision.hidden_size}",
        )
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            _require(
                0 <= getattr(self, name) < self.text.vocab_size,
                name,
                f"must be a token id below text.vocab_size ({self.text.vocab_size})",
            )
        _require(
            self.pad_token_id is None or 0 <= self.pad_token_id < self.text.vocab_size,
            "pad_token_id",
            f"must be a token id below text.vocab_size ({self.text.vocab_size}) or None (no pad token)",
        )
        _require(
            self.image_token_id != self.video_token_id, "video_token_id", "must differ from image_token_id"
        )
        _require(self.torch_dtype in _DTYPES, "torch_dtype", f"must be one of {sorted(_DTYPES)}")

    @property
    def fill_token_id(self) -> int:
        """What fills padded positions (they are masked out of attention and loss): the pad token, else eos."""
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_id

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    def replace(self, **changes) -> Qwen2VLConfig:
        return dataclasses.replace(self, **changes)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _released(
    hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, tied: bool
) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        vision=VisionConfig(hidden_size=hidden),
        text=TextConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            tie_word_embeddings=tied,
        ),
    )


def tiny_config(
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_depth: int = 2,
    vision_dim: int = 32,
) -> Qwen2VLConfig:
    """A model small enough for unit tests; special tokens sit at the top of its small vocabulary."""
    top = vocab_size - 1
    return Qwen2VLConfig(
        vision=VisionConfig(depth=vision_depth, embed_dim=vision_dim, num_heads=2, hidden_size=hidden_size),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(2, 3, 3),
            tie_word_embeddings=False,
        ),
        image_token_id=top,
        video_token_id=top - 1,
        vision_start_token_id=top - 2,
        vision_end_token_id=top - 3,
        bos_token_id=top - 4,
        eos_token_id=top - 5,
        pad_token_id=top - 4,
        torch_dtype="float32",
    )


def demo_config() -> Qwen2VLConfig:
    """The CPU demo model: the real tokenizer's vocabulary and token ids, a few narrow layers."""
    return Qwen2VLConfig(
        vision=VisionConfig(depth=4, embed_dim=128, num_heads=4, hidden_size=256),
        text=TextConfig(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(8, 12, 12),
            tie_word_embeddings=True,
        ),
        torch_dtype="float32",
    )


def mini_config() -> Qwen2VLConfig:
    """The tiny test model with the real tokenizer's vocabulary and token ids, for end-to-end runs on real
    (synthetic) data; untied so it can be pipelined."""
    small = tiny_config()
    text = dataclasses.replace(small.text, vocab_size=151936)
    return Qwen2VLConfig(vision=small.vision, text=text, torch_dtype="float32")


PRESETS = {
    "2b": lambda: _released(1536, 28, 12, 2, 8960, 151936, tied=True),
    "7b": lambda: _released(3584, 28, 28, 4, 18944, 152064, tied=False),
    "72b": lambda: _released(8192, 80, 64, 8, 29568, 152064, tied=False),
    "demo": demo_config,
    "tiny": tiny_config,
    "mini": mini_config,
}


def preset(name: str) -> Qwen2VLConfig:
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"model: unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
