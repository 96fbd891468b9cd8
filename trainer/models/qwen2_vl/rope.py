"""Rotary position embeddings of Qwen2-VL: the ViT's 2D rotary and the LLM's multimodal rotary (M-RoPE).

Position ids follow the rule the released weights were trained with (transformers 4.45 to 4.57): text continues
after a vision block of LLM grid (t, h', w') starting at position s with s + max(t, h', w'). transformers 5
advances by max(h', w') only, which differs for videos with more temporal patches than rows or columns.

Legend: N vision patches, B rows, L tokens per row, D head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """theta^(-2j/dim) for j < dim/2, computed in the order the checkpoints' reference code uses (bit-exact)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------------------------------- vision (2D)


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's merge-window order and repeated per temporal slice: (N, 2)."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): the patches of each merge window become consecutive.
        rows = rows.permute(0, 2, 1, 3).reshape(-1)
        cols = cols.permute(0, 2, 1, 3).reshape(-1)
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_rotary(
    grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int
) -> tuple[torch.Tensor, ...]:
    """cos and sin (N, head_dim) in fp32: the first quarter of the pairs rotate by row, the second by column."""
    inv_freq = inverse_frequencies(head_dim // 2, theta).to(grid_thw.device)
    positions = vision_patch_positions(grid_thw.cpu(), merge).to(grid_thw.device)  # (N, 2)
    table = torch.outer(torch.arange(int(grid_thw[:, 1:].max()), device=grid_thw.device).float(), inv_freq)
    angles = table[positions].flatten(1)  # (N, head_dim/2): row angles then column angles
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def apply_vision_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k: (N, heads, D). The rotation runs in fp32 whatever the model dtype, as in training."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    qf, kf = q.float(), k.float()
    q_out = qf * cos + rotate_half(qf) * sin
    k_out = kf * cos + rotate_half(kf) * sin
    return q_out.to(q.dtype), k_out.to(k.dtype)


# ----------------------------------------------------------------------------------------- language (M-RoPE)


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: Sequence[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (3, B, L) -> cos, sin (B, L, D).

    Frequency j takes its angle from row 0 (time) for the first section, row 1 (height) for the second and row 2
    (width) for the last; both halves of the head dim use the same split. Selecting rows before the cosine is
    exactly the reference's select-after, since cos is elementwise.
    """
    freqs = position_ids[..., None].float() * inv_freq.float()  # (3, B, L, D/2)
    row_of_freq = torch.repeat_interleave(
        torch.arange(3, device=freqs.device), torch.tensor(list(mrope_section), device=freqs.device)
    )
    freqs = freqs.gather(0, row_of_freq.view(1, 1, 1, -1).expand(1, *freqs.shape[1:])).squeeze(0)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, H, L, D), k (B, KV, L, D); cos, sin (B, L, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def sample_position_ids(
    tokens: np.ndarray,
    image_grids: list[tuple[int, int, int]],
    video_grids: list[tuple[int, int, int]],
    *,
    image_token_id: int,
    video_token_id: int,
    merge: int,
) -> tuple[np.ndarray, int]:
    """M-RoPE positions (3, n) of one sample's tokens and the next free position.

    Vision pad runs take the next grid of their kind in order; a block of LLM grid (t, h', w') starting at s gets
    (s + i_t, s + i_h, s + i_w) and the text after it continues at s + max(t, h', w'). Grids are consumed from the
    front of the given lists (the caller's iterators over the whole batch).
    """
    n = len(tokens)
    pos = np.empty((3, n), dtype=np.int64)
    is_vision = (tokens == image_token_id) | (tokens == video_token_id)
    cursor, next_pos = 0, 0
    vision_at = np.flatnonzero(is_vision)
    while cursor < n:
        later = vision_at[vision_at >= cursor]
        end_text = int(later[0]) if len(later) else n
        pos[:, cursor:end_text] = np.arange(next_pos, next_pos + end_text - cursor)
        next_pos += end_text - cursor
        cursor = end_text
        if cursor == n:
            break
        kind, grids = ("image", image_grids) if tokens[cursor] == image_token_id else ("video", video_grids)
        if not grids:
            raise ValueError(f"more {kind} pad tokens in input_ids than {kind} grids")
        t, h, w = grids.pop(0)
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        block = tokens[cursor : cursor + count]
        if len(block) < count or (block != tokens[cursor]).any():
            raise ValueError(
                f"{kind} grid {(t, h, w)} needs {count} consecutive {kind} pad tokens at "
                f"position {cursor}, found fewer"
            )
        it, ih, iw = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pos[:, cursor : cursor + count] = next_pos + np.stack([it.ravel(), ih.ravel(), iw.ravel()])
        next_pos += max(t, gh, gw)
        cursor += count
    return pos, next_pos


def position_ids(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    segment_ids: torch.Tensor,
    image_token_id: int,
    video_token_id: int,
    merge: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, L) for rows of one or more samples, and rope deltas (B, 1).

    `segment_ids` (B, L) numbers the samples of each row (0, 1, ...; -1 for padding). Each sample's positions start
    at 0. Padding keeps position 1, as in the reference. The delta of a row (for cached decoding, one sample per
    row) is its next free position minus the row length.
    """
    ids = input_ids.cpu().numpy()
    segs = segment_ids.cpu().numpy()
    images = [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else []
    videos = [tuple(g) for g in video_grid_thw.tolist()] if video_grid_thw is not None else []
    out = np.ones((3, *ids.shape), dtype=np.int64)
    deltas = np.zeros((ids.shape[0], 1), dtype=np.int64)
    for b in range(ids.shape[0]):
        row_end = 0
        for seg in np.unique(segs[b][segs[b] >= 0]):
            where = np.flatnonzero(segs[b] == seg)
            pos, row_end = sample_position_ids(
                ids[b, where],
                images,
                videos,
                image_token_id=image_token_id,
                video_token_id=video_token_id,
                merge=merge,
            )
            out[:, b, where] = pos
        deltas[b, 0] = row_end - ids.shape[1]
    if images or videos:
        raise ValueError(f"{len(images)} image and {len(videos)} video grids have no pad tokens in input_ids")
    return torch.from_numpy(out).to(input_ids.device), torch.from_numpy(deltas).to(input_ids.device)
