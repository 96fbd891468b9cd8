"""Tensor parallelism for the ViT and the LLM together, applied from outside the single-device model.

Megatron-style: each attention block and MLP is a region whose first matmuls are split by output columns (attention
heads, MLP hidden units) and whose last matmul is split by input rows, so each region costs one all-reduce in
forward (after the row-parallel matmul) and one in backward (at the region's input). The input side is a forward
hook on the norm that feeds the region, so q, k and v (or gate and up) share a single backward all-reduce.

Why not DTensor's parallelize_module: DeepSpeed flattens and partitions plain tensors for ZeRO, and the ViT's fused
qkv needs a head-wise split of each third of its rows, which a plain Shard(0) placement cannot express.

- Split: ViT qkv rows are [q heads | k heads | v heads]; each third is split by heads (3 blocks along dim 0). LLM
  q/k/v by heads (tp must divide num_key_value_heads, so grouped-query pairs stay on one rank). MLP fc1 /
  gate+up by rows, fc2 / down and the attention outputs (o_proj, ViT proj) by columns; their biases are added once,
  after the all-reduce, so they are replicated.
- Replicated: patch embedding, norms, merger, embeddings, lm_head, and the row-parallel biases. They can never
  diverge: their gradients are averaged over the tp group every step (after which every tp rank holds bitwise the
  same gradient, so the deterministic optimizer keeps the weights bitwise equal), and they are broadcast from tp
  rank 0 at start and after loading. `replicated_in_sync` checks the invariant bit for bit.
- Sharded parameters keep their full names and carry `tensor_model_parallel = True`, which DeepSpeed's gradient
  norm reads so replicated parameters are counted once (on tp rank 0) and shards on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from trainer.models.qwen2_vl.config import Qwen2VLConfig

# Parameter name -> (dimension split over tp, number of equal blocks along it that are each split).
_SHARDED = (
    (re.compile(r"visual\.blocks\.\d+\.attn\.qkv\.(weight|bias)$"), 0, 3),
    (re.compile(r"visual\.blocks\.\d+\.mlp\.fc1\.(weight|bias)$"), 0, 1),
    (re.compile(r"visual\.blocks\.\d+\.(attn\.proj|mlp\.fc2)\.weight$"), 1, 1),
    (re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)$"), 0, 1),
    (re.compile(r"model\.layers\.\d+\.mlp\.(gate|up)_proj\.weight$"), 0, 1),
    (re.compile(r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight$"), 1, 1),
)


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """Where a rank's tensor sits in the full (single-device) parameter of the same name."""

    global_shape: tuple[int, ...]
    dim: int | None  # split dimension; None: replicated over tp
    blocks: int = 1  # equal blocks along `dim`, each split over tp (3 for the ViT's fused qkv)
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def sharded(self) -> bool:
        return self.dim is not None and self.tp_size > 1

    @property
    def local_shape(self) -> tuple[int, ...]:
        if not self.sharded:
            return self.global_shape
        shape = list(self.global_shape)
        shape[self.dim] //= self.tp_size
        return tuple(shape)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor (a copy when the part is not contiguous)."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"shard: expected shape {self.global_shape}, got {tuple(full.shape)}")
        if not self.sharded:
            return full
        parts = [b.chunk(self.tp_size, self.dim)[self.tp_rank] for b in full.chunk(self.blocks, self.dim)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)

    def unshard(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every tp rank's shard, in tp-rank order."""
        if not self.sharded:
            return shards[0]
        if len(shards) != self.tp_size:
            raise ValueError(f"unshard: expected {self.tp_size} shards, got {len(shards)}")
        per_rank = [s.chunk(self.blocks, self.dim) for s in shards]
        return torch.cat([per_rank[r][b] for b in range(self.blocks) for r in range(self.tp_size)], self.dim)

    def blocked(self, local: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
        """A rectangular piece of a tp-size-independent global tensor, for resharding tools (DTensor, distributed
        checkpoint). A split parameter made of several blocks (the ViT's fused qkv) is seen with its split
        dimension as (blocks, rows per block) at every tp size, tp = 1 included, so the saved shape never
        depends on tp; other parameters keep their shape. Returns (local view, global shape, offsets)."""
        g = self.global_shape
        if self.dim is None:
            return local, g, (0,) * len(g)
        d, per_rank = self.dim, g[self.dim] // self.blocks // self.tp_size
        if self.blocks > 1:
            g = (*g[:d], self.blocks, g[d] // self.blocks, *g[d + 1 :])
            local = local.reshape(*g[:d], self.blocks, per_rank, *g[d + 2 :])
            d += 1
        offsets = [0] * len(g)
        offsets[d] = self.tp_rank * per_rank
        return local, g, tuple(offsets)


def split_rule(name: str) -> tuple[int, int] | None:
    """(dim, blocks) for a tensor-parallel parameter, None for a replicated one."""
    for pattern, dim, blocks in _SHARDED:
        if pattern.search(name):
            return dim, blocks
    return None


def check_tp_size(cfg: Qwen2VLConfig, tp: int) -> None:
    for name, value in (
        ("vision.num_heads", cfg.vision.num_heads),
        ("vision.mlp_dim", cfg.vision.mlp_dim),
        ("text.num_key_value_heads", cfg.text.num_key_value_heads),
        ("text.intermediate_size", cfg.text.intermediate_size),
    ):
        if value % tp:
            raise ValueError(f"tp: {tp} must divide {name} ({value})")


# --------------------------------------------------------------------------------------- communication


class GroupRef:
    """The tensor-parallel group as the layers see it: one shared holder, so that when the process groups are
    re-formed inside the running process (in-place recovery, trainer/recovery/regroup.py) the engine swaps the
    group in one place instead of rebuilding the layers."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group


class _EnterRegion(torch.autograd.Function):
    """Identity forward; backward all-reduces the input gradient (each rank saw only its heads' part)."""

    @staticmethod
    def forward(ctx, x, ref):
        ctx.ref = ref
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.ref.group)
        return grad, None


class _LeaveRegion(torch.autograd.Function):
    """All-reduce of the row-parallel partial sums in forward; identity backward."""

    @staticmethod
    def forward(ctx, x, ref):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=ref.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: W split by input columns, b replicated and added once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: GroupRef):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _LeaveRegion.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


# ------------------------------------------------------------------------------------------- applying


def apply_tensor_parallel(
    module: nn.Module,
    cfg: Qwen2VLConfig,
    *,
    tp_rank: int,
    tp_size: int,
    group: dist.ProcessGroup | GroupRef | None,
) -> dict[str, ParamLayout]:
    """Shard a Qwen2-VL model (or a pipeline stage of one, which keeps the same names) in place; returns the
    layout of every parameter by full name. With tp_size 1 the modules are left untouched. The layers hold
    `group` through a GroupRef (pass one to swap the group later)."""
    check_tp_size(cfg, tp_size)
    if tp_size > 1:
        assert group is not None
        group = group if isinstance(group, GroupRef) else GroupRef(group)
        for block in _children(module, "visual.blocks"):
            block.attn.num_heads //= tp_size
            _split_linear(block.attn.qkv, tp_rank, tp_size, blocks=3)
            block.attn.proj = _row_parallel(block.attn.proj, tp_rank, tp_size, group)
            _split_linear(block.mlp.fc1, tp_rank, tp_size)
            block.mlp.fc2 = _row_parallel(block.mlp.fc2, tp_rank, tp_size, group)
            _enter_region_after(block.norm1, group)
            _enter_region_after(block.norm2, group)
        for layer in _children(module, "model.layers"):
            attn, mlp = layer.self_attn, layer.mlp
            attn.num_heads //= tp_size
            attn.num_kv_heads //= tp_size
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _split_linear(lin, tp_rank, tp_size)
            attn.o_proj = _row_parallel(attn.o_proj, tp_rank, tp_size, group)
            mlp.down_proj = _row_parallel(mlp.down_proj, tp_rank, tp_size, group)
            _enter_region_after(layer.input_layernorm, group)
            _enter_region_after(layer.post_attention_layernorm, group)
    layouts = {}
    for name, p in module.named_parameters():
        rule = split_rule(name)
        dim, blocks = rule if rule else (None, 1)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp_size
        layouts[name] = ParamLayout(tuple(shape), dim, blocks, tp_rank, tp_size)
    mark_sharded(module, layouts)
    return layouts


def mark_sharded(module: nn.Module, layouts: dict[str, ParamLayout]) -> None:
    """Flag tp shards for DeepSpeed's gradient norm. Call again after anything that replaces Parameter objects
    (materialising a meta-device module does)."""
    for name, p in module.named_parameters():
        p.tensor_model_parallel = layouts[name].sharded


def _children(module: nn.Module, path: str) -> Iterable[nn.Module]:
    container = module
    for part in path.split("."):
        container = getattr(container, part, None)
        if container is None:
            return []
    return container.values() if isinstance(container, nn.ModuleDict) else list(container)


def _split_linear(lin: nn.Linear, tp_rank: int, tp_size: int, *, blocks: int = 1) -> None:
    for name in ("weight", "bias"):
        p = getattr(lin, name)
        if p is None:
            continue
        layout = ParamLayout(tuple(p.shape), 0, blocks, tp_rank, tp_size)
        setattr(lin, name, nn.Parameter(layout.shard(p.detach()).clone(), requires_grad=p.requires_grad))
    lin.out_features = lin.weight.shape[0]


def _row_parallel(lin: nn.Linear, tp_rank: int, tp_size: int, group: GroupRef) -> RowParallelLinear:
    layout = ParamLayout(tuple(lin.weight.shape), 1, 1, tp_rank, tp_size)
    weight = layout.shard(lin.weight.detach()).clone()
    bias = None if lin.bias is None else lin.bias.detach().clone()
    out = RowParallelLinear(weight, bias, group)
    for new, old in ((out.weight, lin.weight), (out.bias, lin.bias)):
        if new is not None:
            new.requires_grad_(old.requires_grad)
    return out


def _enter_region_after(norm: nn.Module, group: GroupRef) -> None:
    norm.register_forward_hook(lambda _module, _inputs, output: _EnterRegion.apply(output, group))


# --------------------------------------------------------------------------------- replicated parameters


def sync_replicated_grads(params: Sequence[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Average the gradients of tp-replicated parameters over the tp group, so every tp rank applies bitwise
    the same update (the all-reduce hands every rank the same bits)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


@torch.no_grad()
def broadcast_replicated(params: Sequence[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Copy tp rank 0's values of replicated tensors to the other tp ranks of the group."""
    if not params or dist.get_world_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    for p in params:
        dist.broadcast(p.data, src=src, group=group)


@torch.no_grad()
def replicated_in_sync(params: Sequence[torch.Tensor], group: dist.ProcessGroup) -> bool:
    """True when every tp rank holds bitwise the same values (compares the bits, not the floats)."""
    if dist.get_world_size(group) == 1 or not params:
        return True
    bits = torch.cat([_bits(p.detach().reshape(-1)) for p in params])
    high, low = bits.clone(), bits
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    return bool(torch.equal(high, low))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor as int32 values (equal exactly when the bits are equal)."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]
    bits = t.view(view)
    # int64 splits into two int32 halves; narrower types widen losslessly.
    return bits.view(torch.int32) if view == torch.int64 else bits.to(torch.int32)
