"""The parallel training engine: a Qwen2-VL model cut into pipeline stages, tensor-parallel within each stage,
trained with ZeRO-1 AdamW over data-parallel replicas. The training loop builds one per rank and calls
`train_step` with this rank's micro-batches of the step.

One step:
1. Count the supervised tokens of the global batch (all-reduce over dp), so every micro-batch's summed loss can be
   scaled to its share of the mean over all supervised tokens: the loss and its gradients do not depend on
   dp, tp, pp or the micro-batching.
2. Run the micro-batches through the 1F1B pipeline; backward accumulates into `.grad`.
3. Average tp-replicated gradients over tp (they can never drift apart), then DeepSpeed reduces over dp, clips by
   the global norm and updates (`zero.py`).

State for checkpoints, by the full model's parameter names (identical at every dp, tp and pp):
- `model_state_dict()`: {name: this rank's tensor}: the tp shard for sharded parameters, the whole tensor
  otherwise (frozen ones included). `param_layouts()[name]` says how a shard sits in the full tensor
  (`tensor.ParamLayout`: shard, unshard, and the tp-independent `blocked` view for DTensor / distributed
  checkpoint). dp ranks hold equal copies; tp ranks hold equal replicated tensors and, under the same name,
  different shards.
- `optimizer_state_dict()`: {"step": updates done (the whole scheduler state), "state": {name: {"fp32",
  "exp_avg", "exp_avg_sq"}}, "fragments": {name: Fragment}}, trainable parameters only: each tensor is the 1-D
  range [start, start + numel) of the flattened local parameter that this dp rank owns under ZeRO-1 (`total`
  elements in all; numel 0 where it owns none). With tp > 1 the flattened local parameter is a tp shard.
- Both return live tensors: stage copies before the next step.
- Loading by copy: `load_model_state_dict` (model alone, e.g. pretrained weights; full unsharded tensors are
  accepted and sharded here; it re-derives the fp32 master copies from the weights), then
  `load_optimizer_state_dict` (each tensor the exact fragment or the whole flattened local parameter, so state
  saved at another dp loads).
- Loading in place (distributed checkpoint writing into the live tensors of both dicts): then call
  `load_optimizer_state_dict` with the same optimizer dict (its copies are skipped): it sets the step and the
  weights from the loaded master copies. Not `load_model_state_dict`, which would overwrite the loaded master
  copies with the (bf16) weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.models.qwen2_vl.config import Qwen2VLConfig
from trainer.models.qwen2_vl.model import IGNORE_INDEX, Qwen2VL, shifted_targets
from trainer.models.qwen2_vl.weights import build_on_meta
from trainer.telemetry.timers import StepTimer

from .config import EngineConfig, is_trainable
from .mesh import Mesh, ParallelDims, init_distributed
from .pipeline import PipelineStage, StageLink, balanced_first_stage_layers, one_f_one_b, split_layers
from .tensor import (
    GroupRef,
    ParamLayout,
    apply_tensor_parallel,
    broadcast_replicated,
    mark_sharded,
    replicated_in_sync,
    sync_replicated_grads,
)
from .vision_bag import count_media
from .zero import Fragment, ZeroStage


@dataclass(slots=True)
class StepResult:
    step: int  # optimizer updates done, this one included
    loss: float  # mean cross-entropy over every supervised token of the global batch
    num_tokens: int  # supervised tokens of the global batch
    grad_norm: float  # global gradient norm before clipping (nan when nothing trains)
    lr: float
    rank_text_tokens: int  # non-padding text tokens in this rank's micro-batches
    rank_vision_tokens: int  # image and video tokens (LLM positions) in this rank's micro-batches
    forward_s: float  # compute, including tp all-reduces inside the layers
    backward_s: float
    optimizer_s: float  # DeepSpeed step: dp gradient reduction, clipping, AdamW, weight all-gather
    comm_s: float  # blocked in pipeline p2p and the engine's own collectives
    vision_bag_loss: float = float("nan")  # mean over the global batch's images and videos; nan when off


class ParallelEngine:
    def __init__(self, model: Qwen2VL, mesh: Mesh, config: EngineConfig):
        cfg, dims = model.cfg, mesh.dims
        if dims.pp > 1 and cfg.text.tie_word_embeddings:
            raise ValueError(
                "pp: tied word embeddings (text.tie_word_embeddings) need pp = 1 (lm_head would live "
                "on the last stage and the embedding on the first)"
            )
        if config.vision_bag_weight and dims.pp > 1:
            raise ValueError(
                "vision_bag_weight: the vision bag loss is added on the last stage and needs pp = 1"
            )
        self.mesh, self.config, self.cfg, self.step = mesh, config, cfg, 0
        model.set_activation_checkpointing(
            vision=_choice(config.checkpoint_vision), text=_choice(config.checkpoint_text)
        )
        k = config.first_stage_layers
        if k is None:
            k = balanced_first_stage_layers(
                cfg,
                dims.pp,
                vision_token_fraction=config.vision_token_fraction,
                supervised_fraction=config.supervised_fraction,
            )
        self.layer_split = split_layers(cfg.text.num_hidden_layers, dims.pp, k)
        self.stage = PipelineStage(
            model, stage=mesh.stage, num_stages=dims.pp, layers=self.layer_split[mesh.stage]
        )
        self.tp_ref = GroupRef(mesh.tp_group)  # the tp layers' group, swapped by `rebind`
        self.layouts = apply_tensor_parallel(
            self.stage, cfg, tp_rank=mesh.coords.tp, tp_size=dims.tp, group=self.tp_ref
        )
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and mesh.device.type == "cuda")
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self._place(mesh.device)
        mark_sharded(self.stage, self.layouts)
        self.named_trainable = []
        for name, p in self.stage.named_parameters():
            p.requires_grad_(is_trainable(name, config.training_stage))
            if p.requires_grad:
                self.named_trainable.append((name, p))
        self.replicated = [p for name, p in self.stage.named_parameters() if not self.layouts[name].sharded]
        self._bind(mesh)

    def rebind(self, mesh: Mesh) -> None:
        """Go on over `mesh`, whose process groups were re-formed inside this process with a replacement for a
        lost rank (in-place recovery): the model, its split and its shards stay; the tp layers switch groups and
        the norm group and the ZeRO-1 engine are made anew over the new groups, with the collectives a new
        engine's construction issues, in the same order, so a replacement building its engine and the survivors
        rebinding theirs meet. The optimizer state is then to be restored (from a snapshot), as after a build."""
        if mesh.dims != self.mesh.dims or mesh.coords != self.mesh.coords:
            raise ValueError(f"rebind: {mesh} does not have this engine's place ({self.mesh})")
        self.mesh = mesh
        self.tp_ref.group = mesh.tp_group
        for p in self.stage.parameters():  # what a step cut short had accumulated must not reach the next one
            p.grad = None
        if self.zero is not None:  # its groups are gone; a new engine is built over the new ones
            self.zero.close()
            self.zero = None
        self._bind(mesh)

    def _bind(self, mesh: Mesh) -> None:
        """Everything built on the process groups: replicated weights made equal over tp, the norm group, the
        stage link and the ZeRO-1 engine (collective, on every rank in the same order)."""
        cfg, config, dims = self.cfg, self.config, mesh.dims
        broadcast_replicated(self.replicated, mesh.tp_group)

        # Which stages train something decides who joins DeepSpeed's norm group and who sends gradients back.
        flags = torch.zeros(dims.pp, dtype=torch.int64, device=mesh.device)
        flags[mesh.stage] = int(bool(self.named_trainable))
        dist.all_reduce(flags, group=mesh.pp_group)
        trains = [bool(f) for f in flags.tolist()]
        if not any(trains):
            raise ValueError(f"training_stage: {config.training_stage} leaves no parameter to train")
        mp_group = mesh.mp_group
        if not all(trains):  # the norm's group: the stages and tp ranks of this replica that train something
            mp_group = mesh.new_group_per(
                [
                    [
                        dims.rank_of(dp=d, pp=s, tp=t)
                        for s in range(dims.pp)
                        if trains[s]
                        for t in range(dims.tp)
                    ]
                    for d in range(dims.dp)
                ]
            )
        self.needs_input_grad = any(trains[: mesh.stage])
        self.link = StageLink(
            prev_rank=None if mesh.is_first_stage else mesh.rank_at(pp=mesh.stage - 1),
            next_rank=None if mesh.is_last_stage else mesh.rank_at(pp=mesh.stage + 1),
            grads_from_next=any(trains[: mesh.stage + 1]),
            hidden=cfg.text.hidden_size,
            dtype=self.dtype,
            device=mesh.device,
        )
        self.zero: ZeroStage | None = None
        if self.named_trainable:
            opt = config.optimizer
            self.zero = ZeroStage(
                self.stage,
                self.named_trainable,
                mesh,
                mp_group,
                lr=opt.lr,
                betas=opt.betas,
                eps=opt.eps,
                weight_decay=opt.weight_decay,
                grad_clip=opt.grad_clip,
                bf16=self.bf16,
                micro_batch_rows=config.micro_batch_rows,
                num_micro_batches=config.num_micro_batches,
            )
        else:  # DeepSpeed would broadcast over dp; frozen stages do it here
            for p in self.stage.parameters():
                dist.broadcast(p.data, src=mesh.rank_at(dp=0), group=mesh.dp_group)

    def _place(self, device: torch.device) -> None:
        """Move to the device in the training dtype; a meta-device model is materialised with fresh init."""
        if any(p.is_meta for p in self.stage.parameters()):
            self.stage.to_empty(device=device)
            self.stage.init_weights()
        self.stage.to(device)
        for p in self.stage.parameters():  # parameters only: the rotary inv_freq buffer stays fp32
            p.data = p.data.to(self.dtype)

    # ---------------------------------------------------------------------------------------- training

    def train_step(
        self,
        micro_batches: Sequence[Mapping[str, torch.Tensor]],
        *,
        timer: StepTimer | None = None,
        before_optimizer: Callable[[], None] | None = None,
        on_micro_step: Callable[[], None] | None = None,
    ) -> StepResult:
        """One optimizer step over this rank's micro-batches (model keyword tensors: input_ids, labels,
        segment_ids, and on stage 0 the pixel and grid tensors; later stages need only the grids).

        With a telemetry `timer`, forward, backward and optimizer time are recorded as its phases and time
        blocked in collectives and pipeline transfers as collective wait. `before_optimizer` runs after the last
        backward and before any gradient reduction: the place for a sync point, so that waiting for a slower rank
        is measured there and not inside the optimizer. `on_micro_step` runs after each micro-batch's backward."""
        self._timer = timer
        if len(micro_batches) != self.config.num_micro_batches:
            raise ValueError(
                f"micro_batches: expected {self.config.num_micro_batches}, got {len(micro_batches)}"
            )
        mesh, dev = self.mesh, self.mesh.device
        batches = [
            {k: v.to(dev, non_blocking=True) for k, v in b.items() if v is not None} for b in micro_batches
        ]
        times = dict(forward=0.0, backward=0.0, optimizer=0.0, comm=0.0)
        self.link.wait_s = 0.0

        with self._clock(times, "comm"):
            local = sum(
                int((shifted_targets(b["labels"], b["segment_ids"]) != IGNORE_INDEX).sum()) for b in batches
            )
            media = sum(count_media(b) for b in batches)
            count = torch.tensor([local, media], dtype=torch.int64, device=dev)
            dist.all_reduce(count, group=mesh.dp_group)
        num_tokens, num_media = (int(c) for c in count.tolist())
        scale = mesh.dims.dp / max(num_tokens, 1)  # DeepSpeed divides by dp when it averages over replicas
        bag = self.vision_bag_active()
        self.stage.vision_bag = bag
        bag_scale = mesh.dims.dp * self.config.vision_bag_weight / max(num_media, 1)
        last, saved = self.stage.is_last, {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        bag_sum = torch.zeros((), dtype=torch.float64, device=dev)

        def forward(i: int, x: torch.Tensor | None) -> torch.Tensor | None:
            nonlocal loss_sum, bag_sum
            with self._clock(times, "forward"):
                if x is not None and self.needs_input_grad:
                    x.requires_grad_()
                out = self.zero(batches[i], x) if self.zero else self.stage(batches[i], x)
                if last:
                    lm, extra = out if isinstance(out, tuple) else (out, None)
                    loss_sum = loss_sum + lm.detach().double()
                    out = lm * scale
                    if extra is not None:
                        bag_sum = bag_sum + extra.detach().double()
                        out = out + extra * bag_scale
                saved[i] = (x, out)
            return None if last else out.detach()

        def backward(i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
            x, y = saved.pop(i)
            with self._clock(times, "backward"):
                # A middle stage backpropagates sum(y * grad): its parameter gradients are y.backward(grad)'s.
                target = y if last else None if grad is None else (y * grad).sum()
                if target is not None and target.requires_grad:
                    run = self.zero.backward if self.zero is not None else torch.Tensor.backward
                    run(target)
            if on_micro_step is not None:
                on_micro_step()
            if x is None or not self.needs_input_grad:
                return None
            return x.grad if x.grad is not None else torch.zeros_like(x)

        one_f_one_b(batches, self.link, forward, backward, stage=mesh.stage, num_stages=mesh.dims.pp)
        times["comm"] += self.link.wait_s  # the compute clocks above never include p2p waits
        if timer is not None:
            timer.record_collective(self.link.wait_s)
        if before_optimizer is not None:
            before_optimizer()

        lr = self.config.optimizer.lr_at(self.step)
        grad_norm = -1.0
        if self.zero is not None:
            with self._clock(times, "comm"):
                for _, p in self.named_trainable:
                    if p.grad is None:  # same reduction on every dp rank, even if this one saw no images
                        p.grad = torch.zeros_like(p)
                sync_replicated_grads([p for p in self.replicated if p.requires_grad], mesh.tp_group)
            with self._clock(times, "optimizer"):
                grad_norm = self.zero.step(lr)
        self.step += 1

        with self._clock(times, "comm"):
            mine = last and mesh.coords.tp == 0
            stats = torch.tensor(
                [loss_sum.item() if mine else 0.0, bag_sum.item() if mine else 0.0],
                device=dev,
                dtype=torch.float64,
            )
            dist.all_reduce(stats)
            norm = torch.tensor([grad_norm], device=dev, dtype=torch.float64)
            dist.all_reduce(norm, op=dist.ReduceOp.MAX)
        if self.config.check_replicated_every and self.step % self.config.check_replicated_every == 0:
            self.check_replicated()
        text, vision = _token_counts(batches, self.cfg)
        return StepResult(
            step=self.step,
            loss=float(stats[0]) / max(num_tokens, 1),
            num_tokens=num_tokens,
            grad_norm=float(norm.item()) if norm.item() >= 0 else float("nan"),
            lr=lr,
            rank_text_tokens=text,
            rank_vision_tokens=vision,
            forward_s=times["forward"],
            backward_s=times["backward"],
            optimizer_s=times["optimizer"],
            comm_s=times["comm"],
            vision_bag_loss=float(stats[1]) / max(num_media, 1) if bag else float("nan"),
        )

    def vision_bag_active(self) -> bool:
        """Whether the update at the current step adds the vision bag loss."""
        steps = self.config.vision_bag_steps
        return self.config.vision_bag_weight > 0 and (steps is None or self.step < steps)

    @contextmanager
    def _clock(self, times: dict[str, float], phase: str):
        timer = getattr(self, "_timer", None)
        scope = (
            nullcontext()
            if timer is None
            else (timer.collective() if phase == "comm" else timer.phase(phase))
        )
        start = time.perf_counter()
        try:
            with scope:
                yield
        finally:
            if self.mesh.device.type == "cuda":
                torch.cuda.synchronize(self.mesh.device)
            times[phase] += time.perf_counter() - start

    def check_replicated(self) -> None:
        """Raise unless every tp rank holds bitwise the same replicated weights."""
        if not replicated_in_sync(self.replicated, self.mesh.tp_group):
            raise RuntimeError(f"{self.mesh}: tensor-parallel replicated weights differ across tp ranks")

    # ------------------------------------------------------------------------------------------- state

    def param_layouts(self) -> dict[str, ParamLayout]:
        return dict(self.layouts)

    def trainable_names(self) -> list[str]:
        return [name for name, _ in self.named_trainable]

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Live (detached) tensors: stage a copy before the next step changes them."""
        return {name: p.detach() for name, p in self.stage.named_parameters()}

    @torch.no_grad()
    def load_model_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, p in self.stage.named_parameters():
            if name not in state:
                raise KeyError(f"model state: no tensor for {name!r}")
            value, layout = state[name], self.layouts[name]
            if layout.sharded and tuple(value.shape) == layout.global_shape:
                value = layout.shard(value)
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"model state: {name!r} has shape {tuple(value.shape)}, expected {tuple(p.shape)} "
                    f"(or the full {layout.global_shape})"
                )
            p.copy_(value)
        broadcast_replicated(self.replicated, self.mesh.tp_group)
        if self.zero is not None:
            self.zero.refresh_master()

    def optimizer_fragments(self) -> dict[str, Fragment]:
        return self.zero.fragments() if self.zero else {}

    def optimizer_state_numel(self) -> int:
        """Elements of optimizer state (fp32 master weights; each Adam moment has as many) on this rank."""
        return self.zero.state_numel() if self.zero else 0

    def optimizer_state_dict(self) -> dict:
        state = self.zero.state_dict() if self.zero else {}
        return {"step": self.step, "state": state, "fragments": self.optimizer_fragments()}

    def load_optimizer_state_dict(self, state: Mapping) -> None:
        """Also the call that completes an in-place load (see the module doc): sets the step, and the weights
        from the fp32 master copies."""
        self.step = int(state["step"])
        if self.zero is not None:
            self.zero.load_state_dict(state["state"], self.step)


def build_engine(model: Qwen2VL | Qwen2VLConfig, dims: ParallelDims, config: EngineConfig) -> ParallelEngine:
    """Initialise torch.distributed (if needed) and build the engine. Given a config, the model is built on the
    meta device and only this rank's stage is allocated, freshly initialised: load weights with
    `load_model_state_dict` (full tensors are sharded by the engine)."""
    mesh = init_distributed(dims)
    return ParallelEngine(build_on_meta(model) if isinstance(model, Qwen2VLConfig) else model, mesh, config)


def _choice(value: bool | tuple[int, ...]) -> bool | set[int]:
    return value if isinstance(value, bool) else set(value)


def _token_counts(batches: Sequence[Mapping[str, torch.Tensor]], cfg) -> tuple[int, int]:
    """Non-padding text tokens and vision tokens (LLM positions) in the micro-batches."""
    vision = text = 0
    for b in batches:
        ids = b["input_ids"]
        v = int(((ids == cfg.image_token_id) | (ids == cfg.video_token_id)).sum())
        vision, text = vision + v, text + int((b["segment_ids"] >= 0).sum()) - v
    return text, vision
