"""Shared fixtures for parity tests against transformers' Qwen2-VL (a test-only dependency, pinned to 4.57).

The batch mixes text, images of different sizes and aspect ratios and a video whose temporal patches outnumber its
merged rows and columns (t=3 > max(h/2, w/2)=2), which is where the position rule matters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import transformers

from trainer.models.qwen2_vl import Qwen2VL
from trainer.models.qwen2_vl.config import Qwen2VLConfig, TextConfig, VisionConfig, tiny_config
from trainer.models.qwen2_vl.weights import canonical_name, config_to_hf

IMAGE_GRIDS = [(1, 4, 6), (1, 8, 4), (1, 2, 2)]
VIDEO_GRIDS = [(3, 4, 4)]


def hf_model(cfg: Qwen2VLConfig, seed: int = 0) -> transformers.Qwen2VLForConditionalGeneration:
    """A transformers model with every weight (biases and norms too) randomised, so none is a no-op."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2VLConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.Qwen2VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def random_model(cfg: Qwen2VLConfig, seed: int = 0) -> Qwen2VL:
    torch.manual_seed(seed)
    model = Qwen2VL(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy between an HF model and ours by canonical (on-disk) names."""
    theirs = {canonical_name(k): v for k, v in src.state_dict().items()}
    missing = dst.load_state_dict({k: theirs[k] for k in dst.state_dict()}, strict=True)
    assert not missing.missing_keys


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor

    def kwargs(self) -> dict:
        return dict(
            attention_mask=self.attention_mask,
            pixel_values=self.pixel_values,
            image_grid_thw=self.image_grid_thw,
            pixel_values_videos=self.pixel_values_videos,
            video_grid_thw=self.video_grid_thw,
        )


def vision_block(cfg: Qwen2VLConfig, token_id: int, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [cfg.vision_start_token_id] + [token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]


def text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 400, (n,), generator=gen).tolist()


def sample_rows(cfg: Qwen2VLConfig, seed: int = 0) -> list[list[int]]:
    """Two samples: text with two images; text with a video, then an image."""
    g = torch.Generator().manual_seed(seed)
    img, vid = cfg.image_token_id, cfg.video_token_id
    row_a = (
        text(g, 5)
        + vision_block(cfg, img, IMAGE_GRIDS[0])
        + text(g, 4)
        + vision_block(cfg, img, IMAGE_GRIDS[1])
        + text(g, 6)
    )
    row_b = (
        text(g, 3)
        + vision_block(cfg, vid, VIDEO_GRIDS[0])
        + text(g, 7)
        + vision_block(cfg, img, IMAGE_GRIDS[2])
        + text(g, 5)
    )
    return [row_a, row_b]


def mixed_batch(cfg: Qwen2VLConfig, *, left_pad: bool = False, seed: int = 0) -> Batch:
    rows = sample_rows(cfg, seed)
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), cfg.pad_token_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left_pad else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[(ids == cfg.image_token_id) | (ids == cfg.video_token_id)] = -100
    # A sample's first token is never a target (real data starts with <|im_start|>). transformers would otherwise
    # train the last left-pad position to predict it; we never predict across a sample boundary.
    labels[torch.arange(len(rows)), mask.argmax(1)] = -100
    g = torch.Generator().manual_seed(seed + 1)
    patch_dim = cfg.vision.patch_dim
    n_img = sum(t * h * w for t, h, w in IMAGE_GRIDS)
    n_vid = sum(t * h * w for t, h, w in VIDEO_GRIDS)
    return Batch(
        ids,
        mask,
        labels,
        torch.randn(n_img, patch_dim, generator=g),
        torch.tensor(IMAGE_GRIDS),
        torch.randn(n_vid, patch_dim, generator=g),
        torch.tensor(VIDEO_GRIDS),
    )


def tiny() -> Qwen2VLConfig:
    return tiny_config()


def tiny_variants() -> list[Qwen2VLConfig]:
    """Random-weight tiny configs that differ where bugs hide: head dims, GQA ratios, M-RoPE sections, depth,
    tied and untied heads."""
    base = tiny_config()
    wide = dataclasses.replace(
        base,
        vision=VisionConfig(depth=1, embed_dim=48, num_heads=3, hidden_size=96),
        text=TextConfig(
            vocab_size=base.text.vocab_size,
            hidden_size=96,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=6,
            num_key_value_heads=3,
            mrope_section=(2, 3, 3),
            tie_word_embeddings=False,
        ),
    )
    mqa_tied = dataclasses.replace(
        base,
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=128),
        text=TextConfig(
            vocab_size=base.text.vocab_size,
            hidden_size=128,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=1,
            mrope_section=(4, 6, 6),
            tie_word_embeddings=True,
        ),
    )
    return [base, wide, mqa_tied]
