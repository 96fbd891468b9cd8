"""The Qwen2-VL vision encoder: tube patch embedding, pre-norm ViT blocks with 2D rotary, the 2x2 patch merger.

- Every image and video of a batch is packed into one patch sequence with no padding. Attention is
  block-diagonal: each temporal slice (2-frame tube row) of each item attends only to itself.
- The patch embedding is a Conv3d whose kernel equals its stride and input, so it is computed as a matmul with
  the same (out, 3, 2, 14, 14) weight: identical maths, deterministic, and faster than a 3D convolution.
- No absolute position embedding and no final norm: the merger's LayerNorm plays that role.

Legend: N patches, C ViT width, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import block_diagonal_attention
from .config import VisionConfig
from .rope import apply_vision_rotary, vision_rotary


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # (N, 3*2*14*14) -> (N, C)
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.view(weight.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], segments: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # each (N, H, D)
        q, k = apply_vision_rotary(q, k, *rotary)
        out = block_diagonal_attention(q, k, v, segments)  # (N, H, D)
        return self.proj(out.reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as the ViT was trained


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)
        self.checkpoint = False  # recompute this block's activations in backward (set by the runtime)

    def forward(self, x, rotary, segments):
        x = x + self.attn(self.norm1(x), rotary, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 window's four patches concatenated and projected to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.window_dim, self.window_dim),
            nn.GELU(),
            nn.Linear(self.window_dim, cfg.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N/4, hidden)
        return self.mlp(self.ln_q(x).view(-1, self.window_dim))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, patch_dim) in the processor's order; grid_thw (items, 3). Returns (N/4, hidden)."""
        if pixel_values.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but the grids describe "
                f"{int(grid_thw.prod(-1).sum())}"
            )
        x = self.patch_embed(pixel_values)
        rotary = vision_rotary(grid_thw, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.spatial_merge_size)
        # One attention segment per temporal slice of each item.
        segments = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        for block in self.blocks:
            if block.checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, rotary, segments, use_reentrant=False)
            else:
                x = block(x, rotary, segments)
        return self.merger(x)
