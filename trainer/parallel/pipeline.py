"""Pipeline parallelism: stages cut from the full model, and the 1F1B schedule over torch.distributed p2p.

Decisions:

- Stage 0 holds the vision encoder, the merger, the token embedding and the first k decoder layers; the other
  layers are split evenly over the remaining stages (a remainder goes to the middle stages, since the last one also
  carries the final norm, lm_head and loss). k defaults to the value that balances the estimated cost (below).
- A stage keeps the full model's parameter names (`model.layers.17.mlp...`), so checkpoints and the trainable
  selection never depend on the split.
- Only hidden states cross stages: (rows, row_len, hidden), a fixed shape per micro-batch because rows are packed
  to a fixed length. Every stage reads the micro-batch's token tensors (input_ids, segment_ids, labels, grids)
  itself and computes M-RoPE positions and the attention mask locally; pixels are only read on stage 0.
- The schedule is ours (`one_f_one_b`), with batched isend/irecv (gloo and NCCL alike): after a warm-up of
  (stages - stage - 1) forwards, each stage alternates one forward and one backward, so at most
  (stages - stage) micro-batches of activations are alive on a stage. Combined send+receive calls keep neighbours from deadlocking.

Cost model for k (FLOPs ~ 2 x parameters touched per token; attention scores are left out): a vision token costs
merge^2 patches x (ViT blocks + patch embedding) plus the merger once; a decoder layer costs its parameters per
token; lm_head costs its parameters per supervised token. Stage 0 gets layers until it reaches 1/pp of the total.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.models.qwen2_vl.attention import text_attention_mask
from trainer.models.qwen2_vl.config import Qwen2VLConfig
from trainer.models.qwen2_vl.model import IGNORE_INDEX, Qwen2VL, RMSNorm, shifted_targets
from trainer.models.qwen2_vl.rope import inverse_frequencies, mrope_cos_sin

from .tensor import RowParallelLinear
from .vision_bag import vision_bag_loss

Batch = Mapping[str, torch.Tensor]


# ------------------------------------------------------------------------------------------ the split


def balanced_first_stage_layers(
    cfg: Qwen2VLConfig, pp: int, *, vision_token_fraction: float = 0.5, supervised_fraction: float = 0.25
) -> int:
    """Decoder layers for stage 0 so that ViT + merger + those layers cost about 1/pp of a step (see module doc).
    The fractions describe the data: the share of row tokens that are vision tokens, and that have a label."""
    if pp == 1:
        return cfg.text.num_hidden_layers
    v, t = cfg.vision, cfg.text
    window = v.embed_dim * v.spatial_merge_size**2
    block = 4 * v.embed_dim * v.embed_dim + 2 * v.embed_dim * v.mlp_dim  # qkv + proj + fc1 + fc2
    merger = window * window + window * v.hidden_size
    patches = v.spatial_merge_size**2 * (v.depth * block + v.patch_dim * v.embed_dim)
    vision = vision_token_fraction * (patches + merger)
    kv = t.num_key_value_heads * t.head_dim
    layer = (
        2 * t.hidden_size * t.hidden_size + 2 * t.hidden_size * kv + 3 * t.hidden_size * t.intermediate_size
    )
    head = supervised_fraction * t.hidden_size * t.vocab_size
    total = vision + t.num_hidden_layers * layer + head
    k = round((total / pp - vision) / layer)
    return max(0, min(t.num_hidden_layers, k))


def split_layers(num_layers: int, pp: int, first_stage_layers: int) -> list[range]:
    """Decoder layer indices per stage."""
    if not 0 <= first_stage_layers <= num_layers:
        raise ValueError(f"first_stage_layers: must be in [0, {num_layers}], got {first_stage_layers}")
    if pp == 1:
        return [range(num_layers)]
    rest, others = num_layers - first_stage_layers, pp - 1
    # The remainder (< others) goes one layer each to the stages right after stage 0, never to the last.
    counts = [rest // others + (1 if i < rest % others else 0) for i in range(others)]
    ranges, start = [range(first_stage_layers)], first_stage_layers
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


# ------------------------------------------------------------------------------------------ the stage


class PipelineStage(nn.Module):
    """One stage cut from a full Qwen2VL in place (the rest is dropped), keeping the full parameter names.

    forward(batch, hidden) returns the hidden states (B, L, C) to send on, or on the last stage the summed
    cross-entropy over the micro-batch's supervised tokens (fp32 scalar). While `vision_bag` is set (only
    possible with pp = 1) the last stage returns (that sum, the summed vision bag loss: `vision_bag.py`).
    """

    def __init__(self, model: Qwen2VL, *, stage: int, num_stages: int, layers: range):
        super().__init__()
        self.stage, self.num_stages, self.layer_ids = stage, num_stages, layers
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        text = model.model
        if not self.is_first:
            model.visual = None
            text.embed_tokens = None
        if not self.is_last:
            text.norm = None
            model.lm_head = None
        text.layers = nn.ModuleDict({str(i): text.layers[i] for i in layers})
        self.visual = model.visual
        self.model = text
        self.lm_head = model.lm_head
        object.__setattr__(self, "full", model)  # for embed() and positions(); not a submodule
        self.cfg = model.cfg
        self.vision_bag = False  # the engine turns it on for the steps that add the vision bag loss

    @torch.no_grad()
    def materialize(self, device: torch.device, std: float = 0.02) -> None:
        """Allocate a meta-device stage on `device` with Qwen2VL's from-scratch init (row-parallel linears
        included) and its rotary buffer; load real weights afterwards."""
        self.to_empty(device=device)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding, RowParallelLinear)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        text = self.cfg.text
        self.model.inv_freq = inverse_frequencies(text.head_dim, text.rope_theta).to(device)

    def forward(self, batch: Batch, hidden: torch.Tensor | None = None) -> torch.Tensor:
        input_ids, segment_ids = batch["input_ids"], batch["segment_ids"]
        positions, _ = self.full.positions(
            input_ids, segment_ids, batch.get("image_grid_thw"), batch.get("video_grid_thw")
        )
        vision: list | None = [] if self.vision_bag else None
        if self.is_first:
            x = self.full.embed(
                input_ids,
                pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"),
                pixel_values_videos=batch.get("pixel_values_videos"),
                video_grid_thw=batch.get("video_grid_thw"),
                vision_out=vision,
            )
        else:
            x = hidden
        mask = None if bool((segment_ids == 0).all()) else text_attention_mask(segment_ids, x)
        rotary = mrope_cos_sin(positions, self.model.inv_freq, self.cfg.text.mrope_section, x.dtype)
        for layer in self.model.layers.values():
            if layer.checkpoint and torch.is_grad_enabled():
                x = checkpoint(layer, x, rotary, mask, use_reentrant=False)
            else:
                x = layer(x, rotary, mask)
        if not self.is_last:
            return x
        x = self.model.norm(x)
        targets = shifted_targets(batch["labels"], segment_ids)
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(x[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if vision is None:
            return loss
        bag = vision_bag_loss(vision, batch, merge=self.cfg.vision.spatial_merge_size)
        return loss, bag


# ---------------------------------------------------------------------------------------- p2p and 1F1B


class StageLink:
    """Hidden states forward and their gradients backward between neighbouring stages of one replica."""

    def __init__(
        self,
        *,
        prev_rank: int | None,
        next_rank: int | None,
        grads_from_next: bool,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.prev, self.next = prev_rank, next_rank
        # False when no stage up to this one trains anything: then no gradient comes back at all.
        self.grads_from_next = grads_from_next and next_rank is not None
        self.hidden, self.dtype, self.device = hidden, dtype, device
        self.wait_s = 0.0  # time blocked in p2p, reset by the caller

    def buffer(self, batch: Batch) -> torch.Tensor:
        rows, length = batch["input_ids"].shape
        return torch.empty(rows, length, self.hidden, dtype=self.dtype, device=self.device)

    def grad_buffer(self, batch: Batch) -> torch.Tensor | None:
        return self.buffer(batch) if self.grads_from_next else None

    def exchange(
        self,
        *,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: torch.Tensor | None = None,
        recv_next: torch.Tensor | None = None,
    ) -> None:
        """Post every given transfer at once (peers that do not exist are skipped), then wait for all of them."""
        ops = []
        for tensor, peer, op in (
            (send_next, self.next, dist.isend),
            (send_prev, self.prev, dist.isend),
            (recv_prev, self.prev, dist.irecv),
            (recv_next, self.next, dist.irecv),
        ):
            if tensor is not None and peer is not None:
                ops.append(dist.P2POp(op, tensor.contiguous() if op is dist.isend else tensor, peer))
        if not ops:
            return
        start = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        self.wait_s += time.perf_counter() - start


def one_f_one_b_order(stage: int, num_stages: int, num_micro: int) -> list[tuple[str, int]]:
    """The order of forwards ("F", i) and backwards ("B", i) on one stage."""
    warmup = min(num_stages - stage - 1, num_micro)
    order = [("F", i) for i in range(warmup)]
    for j in range(num_micro - warmup):
        order += [("F", warmup + j), ("B", j)]
    order += [("B", i) for i in range(num_micro - warmup, num_micro)]
    return order


def one_f_one_b(
    batches: Sequence[Batch],
    link: StageLink,
    forward: Callable[[int, torch.Tensor | None], torch.Tensor | None],
    backward: Callable[[int, torch.Tensor | None], torch.Tensor | None],
    *,
    stage: int,
    num_stages: int,
) -> None:
    """Run one step's micro-batches through this stage in 1F1B order.

    forward(i, received hidden or None) returns the tensor to send on (None on the last stage);
    backward(i, received gradient or None) returns the gradient of the received hidden to send back (None on
    stage 0, or when no earlier stage trains anything).
    """
    m = len(batches)
    first = stage == 0
    warmup = min(num_stages - stage - 1, m)

    def recv_forward(i: int) -> torch.Tensor | None:
        if first:
            return None
        x = link.buffer(batches[i])
        link.exchange(recv_prev=x)
        return x

    for i in range(warmup):
        x = recv_forward(i)
        link.exchange(send_next=forward(i, x))
    x = recv_forward(warmup) if warmup < m else None
    for j in range(m - warmup):
        i = warmup + j
        y = forward(i, x)
        grad = link.grad_buffer(batches[j])
        link.exchange(send_next=y, recv_next=grad)
        grad_x = backward(j, grad)
        if j == m - warmup - 1:
            link.exchange(send_prev=grad_x)
        else:
            x = None if first else link.buffer(batches[i + 1])
            link.exchange(send_prev=grad_x, recv_prev=x)
    for i in range(m - warmup, m):
        grad = link.grad_buffer(batches[i])
        link.exchange(recv_next=grad)
        link.exchange(send_prev=backward(i, grad))
