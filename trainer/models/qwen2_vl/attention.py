"""Attention kernels shared by the ViT and the LLM.

Both go through `torch.nn.functional.scaled_dot_product_attention`; where the `flash_attn` package is installed and
the tensors are half precision on a GPU, the varlen kernel runs instead (no mask is materialised).

- ViT: block-diagonal over segments of different lengths. Consecutive segments of equal length (all slices of a
  video, same-size images in a row) are stacked into a batch and attended in one call; there is no padding.
- LLM: causal attention within each sample of a packed row. A row of one sample uses the causal kernel; rows with
  several samples or padding use a boolean mask (same sample and not in the future), or with flash-attn the
  varlen kernel over the rows laid end to end, each sample and padding run its own sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # optional GPU kernel
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - not installable without CUDA
    flash_attn_varlen_func = None


def _use_flash(q: torch.Tensor) -> bool:
    return flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def block_diagonal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """q, k, v (N, H, D); segments: lengths of consecutive segments summing to N. Returns (N, H, D)."""
    lengths = segments.tolist()
    if _use_flash(q):
        cu = F.pad(segments.cumsum(0, dtype=torch.int32), (1, 0)).to(q.device)
        return flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=False)
    # Runs of consecutive equal-length segments (a video's slices, same-size images in a row) are stacked into one
    # batched call; runs are contiguous, so slicing needs no gather.
    outputs, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n, count = lengths[i], j - i
        qb, kb, vb = (
            t[start : start + n * count].view(count, n, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
        )
        outputs.append(
            F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(n * count, *q.shape[1:])
        )
        start, i = start + n * count, j
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def segment_mask(segment_ids: torch.Tensor, q_len: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, Lq, Lk): key j is visible to query i when it is in the same sample and not later.

    Queries are the last `q_len` positions (all by default). A padding query (segment -1) sees only itself, so no
    softmax row is empty; its output is never used.
    """
    k_len = segment_ids.shape[1]
    q_len = k_len if q_len is None else q_len
    q_seg = segment_ids[:, k_len - q_len :]
    q_pos = torch.arange(k_len - q_len, k_len, device=segment_ids.device)
    k_pos = torch.arange(k_len, device=segment_ids.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Lq, Lk)
    same = (q_seg[:, :, None] == segment_ids[:, None, :]) & (q_seg[:, :, None] >= 0)
    itself = k_pos[None, :] == q_pos[:, None]
    return ((same & causal) | itself).unsqueeze(1)


class Varlen(NamedTuple):
    """Packed rows for the flash-attn varlen kernel: boundaries of every sample (and padding run) in B*L tokens."""

    cu_seqlens: torch.Tensor  # (segments + 1,) int32
    max_len: int


def varlen_segments(segment_ids: torch.Tensor) -> Varlen:
    """Cumulative boundaries of the runs of equal segment id in each row, rows laid end to end."""
    b, n = segment_ids.shape
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.nonzero(change.reshape(-1)).squeeze(1)
    cu = torch.cat([starts, starts.new_tensor([b * n])]).to(torch.int32)
    return Varlen(cu, int((cu[1:] - cu[:-1]).max()))


def text_attention_mask(segment_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor | Varlen:
    """What `causal_attention` needs for packed or padded rows: varlen boundaries where flash-attn runs, else a
    dense boolean mask."""
    return varlen_segments(segment_ids) if _use_flash(like) else segment_mask(segment_ids)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Varlen | None
) -> torch.Tensor:
    """q (B, H, Lq, D), k and v (B, KV, Lk, D) with KV dividing H; mask None means plain causal. Returns q's shape."""
    if isinstance(mask, Varlen):
        b, h, n, d = q.shape
        flat = [t.transpose(1, 2).reshape(b * n, t.shape[1], d) for t in (q, k, v)]
        out = flash_attn_varlen_func(
            *flat, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len, causal=True
        )
        return out.view(b, n, h, d).transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
