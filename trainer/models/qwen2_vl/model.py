"""Qwen2-VL: the Qwen2 decoder with multimodal rotary positions, fed by the vision encoder.

- Decoder layer: pre-norm RMSNorm, grouped-query attention (q/k/v with bias, o without), SwiGLU MLP.
- RMSNorm normalises in fp32 and casts back before the weight multiply, as the checkpoints were trained.
- Vision features replace the embeddings of the image and video pad tokens in order; the counts must match.
- Rows may pack several samples (`segment_ids`): each attends only within itself and its positions start at 0,
  so packing changes nothing numerically. Padding is segment -1.
- Loss: next-token cross-entropy in fp32 over labels != -100, never across a sample boundary.
- A model may hold only some of its modules (a pipeline stage, cut from outside by `trainer.parallel.pipeline`):
  without the embedding (and vision encoder) its forward starts from `hidden`, the previous stage's output;
  `model.layers` holds the decoder layers under their global indices; without the final norm and lm_head it
  returns the hidden states. Nothing else in this file knows about pipelines.

Module and parameter names equal the checkpoints' on-disk names (`visual.*`, `model.*`, `lm_head`).
Legend: B rows, L tokens, C hidden, H heads, KV key-value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import causal_attention, text_attention_mask
from .config import Qwen2VLConfig, TextConfig
from .kv_cache import KVCache
from .rope import apply_rotary, inverse_frequencies, mrope_cos_sin, position_ids
from .vision import VisionTransformer

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, rotary, mask, cache: KVCache | None = None, layer: int = 0):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # (B, KV, L, D)
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = causal_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Mlp(cfg)
        self.checkpoint = False  # recompute this layer's activations in backward (set by the runtime)

    def forward(self, x, rotary, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """The Qwen2 decoder stack without the output head (`model.*` in the checkpoints). `layers` is keyed by the
    global layer index ("0", "1", ...), so a pipeline stage that keeps some of them keeps their names."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(cfg.num_hidden_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.init_rotary()

    def init_rotary(self, device: torch.device | None = None) -> None:
        """(Re)compute the rotary frequencies (a buffer, in no checkpoint) on `device`, by default the buffer's."""
        device = self.inv_freq.device if device is None else device
        self.inv_freq = inverse_frequencies(self.cfg.head_dim, self.cfg.rope_theta).to(device)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (B, L, C): the token embeddings, or the previous pipeline stage's output. Runs the layers held here,
        then the final norm if held."""
        rotary = mrope_cos_sin(positions, self.inv_freq, self.cfg.mrope_section, x.dtype)
        for key, layer in self.layers.items():
            if layer.checkpoint and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, rotary, mask, use_reentrant=False)
            else:
                x = layer(x, rotary, mask, cache, int(key))
        return x if self.norm is None else self.norm(x)


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, L, V); None when only the loss was asked for
    loss: torch.Tensor | None = None  # mean (or sum, see `loss_reduction`) over supervised tokens
    num_loss_tokens: int = 0
    rope_deltas: torch.Tensor | None = None  # (B, 1), for cached decoding
    hidden: torch.Tensor | None = None  # (B, L, C) from a model without lm_head (a stage before the last)


class Qwen2VL(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.visual: VisionTransformer | None = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg.text)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Initialisation for training from scratch: unit norm weights, zero biases, normal(0, std) for every other
        weight (matrices, the patch convolution, embeddings; the checkpoints' `initializer_range` is 0.02), and the
        rotary frequencies. The rules go by a parameter's role, not its module's class, so the same pass
        initialises whatever modules are here: a pipeline stage, or tensor-parallel shards (a linear layer
        replaced by a row-parallel one). A no-op on the meta device; after `to_empty`, it fills every tensor."""
        for module in self.modules():
            norm = isinstance(module, (nn.LayerNorm, RMSNorm))
            for name, p in module.named_parameters(recurse=False):
                if name == "bias":
                    nn.init.zeros_(p)
                elif norm:
                    nn.init.ones_(p)
                else:
                    nn.init.normal_(p, std=std)
        self.model.init_rotary()

    # ------------------------------------------------------------------------------------------- pieces

    def embed(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        vision_out: list | None = None,
    ) -> torch.Tensor:
        """Token embeddings with vision features written over the image and video pad tokens: (B, L, C).
        With a `vision_out` list, each kind's (kind, pad token id, features, grid) is appended to it (for a
        training objective on the vision features themselves)."""
        x = self.model.embed_tokens(input_ids)
        for kind, token_id, pixels, grid in (
            ("image", self.cfg.image_token_id, pixel_values, image_grid_thw),
            ("video", self.cfg.video_token_id, pixel_values_videos, video_grid_thw),
        ):
            slots = input_ids == token_id
            num_slots = int(slots.sum())
            if pixels is None:
                if num_slots:
                    raise ValueError(
                        f"input_ids has {num_slots} {kind} pad tokens but no {kind} pixels were given"
                    )
                continue
            features = self.visual(pixels, grid).to(x.dtype)
            if features.shape[0] != num_slots:
                raise ValueError(
                    f"{kind} features and {kind} pad tokens do not match: "
                    f"{features.shape[0]} features, {num_slots} tokens"
                )
            x = x.masked_scatter(slots.unsqueeze(-1), features)
            if vision_out is not None:
                vision_out.append((kind, token_id, features, grid))
        return x

    def positions(self, input_ids, segment_ids, image_grid_thw=None, video_grid_thw=None):
        return position_ids(
            input_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            segment_ids=segment_ids,
            image_token_id=self.cfg.image_token_id,
            video_token_id=self.cfg.video_token_id,
            merge=self.cfg.vision.spatial_merge_size,
        )

    def set_activation_checkpointing(self, *, vision: bool | set[int] = False, text: bool | set[int] = False):
        """Choose the ViT blocks and decoder layers (all, none, or a set of indices) to recompute in backward."""
        vision_blocks = {} if self.visual is None else dict(enumerate(self.visual.blocks))
        text_layers = {int(key): layer for key, layer in self.model.layers.items()}
        for choice, blocks in ((vision, vision_blocks), (text, text_layers)):
            for i, block in blocks.items():
                block.checkpoint = choice if isinstance(choice, bool) else i in choice

    # ------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_reduction: Literal["mean", "sum"] = "mean",
        hidden: torch.Tensor | None = None,
        vision_out: list | None = None,
    ) -> ModelOutput:
        """input_ids (B, L). Give `attention_mask` (1 keep, 0 pad) for padded batches or `segment_ids` (sample
        index per token, -1 pad) for packed rows; with neither, every row is one sample. With `labels` and
        `return_logits=False` (training) only the loss is computed, projecting just the supervised positions.

        On a model that holds no token embedding (a later pipeline stage), `hidden` (B, L, C) is the previous
        stage's output and the pixels are not read; the token tensors still give positions and the mask. A model
        without lm_head returns the hidden states of its last layer (`ModelOutput.hidden`). `vision_out` is
        passed to `embed`."""
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction: must be 'mean' or 'sum', got {loss_reduction!r}")
        if (hidden is None) != (self.model.embed_tokens is not None):
            raise ValueError("hidden: give it exactly when the model has no token embedding")
        if segment_ids is None:
            segment_ids = (
                torch.zeros_like(input_ids)
                if attention_mask is None
                else torch.where(attention_mask.bool(), 0, -1)
            )
        single = attention_mask is None and bool((segment_ids == 0).all())
        deltas = None
        if position_ids is None:
            position_ids, deltas = self.positions(input_ids, segment_ids, image_grid_thw, video_grid_thw)
        if hidden is None:
            x = self.embed(
                input_ids,
                pixel_values=pixel_values,
                image_grid_thw=image_grid_thw,
                pixel_values_videos=pixel_values_videos,
                video_grid_thw=video_grid_thw,
                vision_out=vision_out,
            )
        else:
            x = hidden
        mask = None if single else text_attention_mask(segment_ids, x)
        hidden = self.model(x, position_ids, mask)
        if self.lm_head is None:
            return ModelOutput(logits=None, rope_deltas=deltas, hidden=hidden)
        if labels is not None and not return_logits:
            # Training: project only the positions that have a target; the full (B, L, V) logits are never built.
            targets = shifted_targets(labels, segment_ids)
            keep = targets != IGNORE_INDEX
            logits = self.lm_head(hidden[:, :-1][keep])
            if logits.shape[0] or loss_reduction == "sum":
                loss = F.cross_entropy(logits.float(), targets[keep], reduction=loss_reduction)
            else:  # the mean over no token: zero, still connected to the graph
                loss = logits.sum() * 0.0
            return ModelOutput(logits=None, loss=loss, num_loss_tokens=int(keep.sum()), rope_deltas=deltas)
        logits = self.lm_head(hidden)
        out = ModelOutput(logits=logits, rope_deltas=deltas)
        if labels is not None:
            out.loss, out.num_loss_tokens = next_token_loss(
                logits, labels, segment_ids, reduction=loss_reduction
            )
        return out


def shifted_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """The target of position t is labels[t + 1], ignored where t + 1 starts another sample: (B, L - 1)."""
    targets = labels[:, 1:].clone()
    if segment_ids is not None:
        targets[segment_ids[:, 1:] != segment_ids[:, :-1]] = IGNORE_INDEX
    return targets


def next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    *,
    reduction: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, int]:
    """Cross-entropy (fp32) of predicting labels[t+1] from position t, averaged or summed over the supervised
    tokens; targets in another sample are ignored."""
    targets = shifted_targets(labels, segment_ids)
    count = int((targets != IGNORE_INDEX).sum())
    flat = logits[:, :-1].flatten(0, 1).float()
    loss = F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)
    return loss, count
