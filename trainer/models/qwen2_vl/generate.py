"""Greedy decoding with a KV cache and the M-RoPE decode rule.

At prefill the rows' M-RoPE positions are computed from their text and vision blocks, and each row's rope delta
(next free position minus row length) is kept. Every later token sits at cache length + delta on all three
position rows, which continues the sequence right after its largest position, as the released models decode.
Rows may be left-padded (attention_mask); finished rows are filled with the pad token.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .attention import segment_mask
from .kv_cache import KVCache
from .model import Qwen2VL


@torch.no_grad()
def generate(
    model: Qwen2VL,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_ids: Iterable[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Return (B, L + generated) token ids: the prompt followed by greedy continuations."""
    cfg = model.cfg
    eos = torch.tensor(
        sorted(set(eos_token_ids if eos_token_ids is not None else [cfg.eos_token_id])),
        device=input_ids.device,
    )
    pad = cfg.fill_token_id if pad_token_id is None else pad_token_id
    batch, prompt_len = input_ids.shape
    key_valid = (
        torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    )
    padded = not bool(key_valid.all())
    segment_ids = torch.where(key_valid, 0, -1)

    positions, deltas = model.positions(input_ids, segment_ids, image_grid_thw, video_grid_thw)
    embeds = model.embed(
        input_ids,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
    )
    text = cfg.text
    cache = KVCache(
        num_layers=text.num_hidden_layers,
        batch=batch,
        num_kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        max_len=prompt_len + max_new_tokens,
        dtype=embeds.dtype,
        device=embeds.device,
    )
    hidden = model.model(embeds, positions, segment_mask(segment_ids) if padded else None, cache)
    cache.advance(prompt_len)

    tokens = [input_ids]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        next_token = model.lm_head(hidden[:, -1]).argmax(-1)
        next_token = torch.where(done, pad, next_token)
        tokens.append(next_token[:, None])
        done |= torch.isin(next_token, eos)
        if bool(done.all()) or cache.length == cache.max_len:
            break
        key_valid = torch.cat([key_valid, key_valid.new_ones(batch, 1)], dim=1)
        step_positions = (cache.length + deltas).view(1, batch, 1).expand(3, -1, -1)
        mask = key_valid[:, None, None, :] if padded else None
        hidden = model.model(model.model.embed_tokens(next_token[:, None]), step_positions, mask, cache)
        cache.advance(1)
    return torch.cat(tokens, dim=1)
