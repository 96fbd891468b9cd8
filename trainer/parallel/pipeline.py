"""Pipeline parallelism: stages cut from the full model, and the 1F1B schedule over torch.distributed p2p.

Decisions:

- Stage 0 holds the vision encoder, the merger, the token embedding and the first k decoder layers; the other
  layers are split evenly over the remaining stages (a remainder goes to the middle stages, since the last one also
  carries the final norm, lm_head and loss). k defaults to the value that balances the estimated cost (below).
- A stage is the model cut in place to its own modules (torchtitan's pattern, `cut_to_stage`) and run by its
  own forward, which skips the modules that are not there; its init is `Qwen2VL.init_weights`. `PipelineStage`
  adds only the call with the training objective. The layers kept sit under their global keys, so a stage keeps
  the full model's parameter names (`model.layers.17.mlp...`) and checkpoints and the trainable selection never
  depend on the split.
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
from torch import nn

from trainer.models.qwen2_vl.config import Qwen2VLConfig
from trainer.models.qwen2_vl.model import Qwen2VL

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


def cut_to_stage(model: Qwen2VL, layers: range, *, first: bool, last: bool) -> None:
    """Drop, in place, the modules of `model` that another stage holds: the vision encoder and the token
    embedding unless `first`, the final norm and lm_head unless `last`, and every decoder layer not in `layers`
    (the others keep their global keys, hence their parameter names). The model's forward skips what is gone."""
    text = model.model
    if not first:
        model.visual = None
        text.embed_tokens = None
    if not last:
        text.norm = None
        model.lm_head = None
    for key in [k for k in text.layers if int(k) not in layers]:
        del text.layers[key]


class PipelineStage(nn.Module):
    """One stage for training: a Qwen2VL cut to this stage's modules (`cut_to_stage`), run by its own forward,
    with the training objective on the last stage. This is the module DeepSpeed wraps.

    forward(batch, hidden) returns the hidden states (B, L, C) to send on, or on the last stage the summed
    cross-entropy over the micro-batch's supervised tokens (fp32 scalar). While `vision_bag` is set (only
    possible with pp = 1) the last stage returns (that sum, the summed vision bag loss: `vision_bag.py`).
    Outputs are plain tensors because DeepSpeed hooks its backward bookkeeping onto the module's output tensors.
    """

    def __init__(self, model: Qwen2VL, *, stage: int, num_stages: int, layers: range):
        super().__init__()
        self.stage, self.num_stages, self.layer_ids = stage, num_stages, layers
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        cut_to_stage(model, layers, first=self.is_first, last=self.is_last)
        # The model's children are registered here under their own names, and the model itself is not a
        # submodule: every parameter keeps the full model's name (`model.layers.17.mlp...`).
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "net", model)
        self.cfg = model.cfg
        self.vision_bag = False  # the engine turns it on for the steps that add the vision bag loss

    def init_weights(self) -> None:
        """The model's own from-scratch init over the modules held here (after `to_empty` from the meta device;
        tensor-parallel shards included)."""
        self.net.init_weights()

    def forward(
        self, batch: Batch, hidden: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        vision: list | None = [] if self.vision_bag else None
        out = self.net(
            batch["input_ids"],
            segment_ids=batch["segment_ids"],
            labels=batch["labels"],
            pixel_values=batch.get("pixel_values"),
            image_grid_thw=batch.get("image_grid_thw"),
            pixel_values_videos=batch.get("pixel_values_videos"),
            video_grid_thw=batch.get("video_grid_thw"),
            hidden=hidden,
            return_logits=False,
            loss_reduction="sum",
            vision_out=vision,
        )
        if not self.is_last:
            return out.hidden
        if vision is None:
            return out.loss
        return out.loss, vision_bag_loss(vision, batch, merge=self.cfg.vision.spatial_merge_size)


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
