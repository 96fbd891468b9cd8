"""ZeRO-1 through DeepSpeed: one DeepSpeed engine per pipeline stage, driven by our own pipeline schedule.

What DeepSpeed does here: it flattens the stage's trainable parameters, partitions the fp32 master weights and
the Adam moments over the data-parallel group (each dp rank holds 1/dp), reduces gradients over dp at the step,
computes the global gradient norm (over dp, and over the model-parallel group we hand it: all pipeline stages
and tp ranks of one replica, counting tp-replicated parameters once), clips, steps AdamW and all-gathers the
updated weights. bf16 weights with fp32 master copies on GPU, fp32 throughout on CPU.

What it does not do: tensor parallelism (ours, `tensor.py`), the pipeline (ours, `pipeline.py`; DeepSpeed's
PipelineEngine wants a sequential module fed from its own loader, and cannot hand later stages the token tensors
they need for positions and masks), and the loss normalisation (ours: the engine scales each micro-batch's summed
loss so the total is the mean over all supervised tokens of the global batch).

How it is driven:
- `managed_gradient_accumulation: false`: `backward` only accumulates into `.grad`; `step` does the dp
  reduction and the update. Between the last backward and the step the engine averages tp-replicated gradients
  and sums tied-embedding gradients across stages, which DeepSpeed's boundary would otherwise come too early for.
- `backward(loss, scale_wrt_gas=False)`: no 1/accumulation-steps factor; DeepSpeed's 1/dp averaging remains, and
  the engine's loss scale multiplies by dp to cancel it.
- A non-last stage backpropagates `(output * grad_from_next_stage).sum()`, whose parameter gradients equal
  `output.backward(grad)`.
- DeepSpeed on CPU JIT-compiles a shared-memory all-reduce op that only its inference path uses; its build is
  skipped (no compiler needed) and torch's AdamW is the optimizer, so nothing is compiled. Its optimizer check,
  which imports (and torch.compiles) its Muon optimizer, is reduced to the supported-type test it ends in.

Optimizer state for checkpoints is exported per parameter: the fragment [start, start + numel) of the flattened
local (tp-sharded) parameter that this dp rank owns, for the fp32 master and both moments, plus the Adam step.
A fragment says which range it covers, so a checkpoint written at one dp size can be sliced for another.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .mesh import Mesh

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True, slots=True)
class Fragment:
    """The part of one flattened local parameter whose optimizer state this dp rank holds."""

    start: int
    numel: int
    total: int  # elements of the local (tp-sharded) parameter


def _import_deepspeed(device: torch.device):
    accelerator = "cpu" if device.type == "cpu" else "cuda"
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    if os.environ["DS_ACCELERATOR"] != accelerator:
        raise RuntimeError(
            f"DS_ACCELERATOR is {os.environ['DS_ACCELERATOR']!r} but the mesh runs on {device.type}"
        )
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if accelerator == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    # DeepSpeed's optimizer check imports its Muon optimizer, whose import runs torch.compile (seconds per
    # process); our optimizer is torch's AdamW, which is on the supported list anyway.
    engine_module = sys.modules["deepspeed.runtime.engine"]
    supported = getattr(sys.modules["deepspeed.runtime.zero.utils"], "ZERO_SUPPORTED_OPTIMIZERS", None)
    if supported is not None and hasattr(engine_module, "is_zero_supported_optimizer"):
        engine_module.is_zero_supported_optimizer = lambda optimizer: type(optimizer) in supported
    return deepspeed


class _Mpu:
    """The model-parallel unit DeepSpeed asks for its groups (Megatron's interface)."""

    def __init__(self, mesh: Mesh, mp_group: dist.ProcessGroup):
        self.mesh, self.mp_group = mesh, mp_group

    def get_data_parallel_group(self):
        return self.mesh.dp_group

    def get_data_parallel_world_size(self):
        return self.mesh.dims.dp

    def get_data_parallel_rank(self):
        return self.mesh.coords.dp

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.mp_group)

    def get_model_parallel_rank(self):
        return dist.get_rank(self.mp_group)

    def get_tensor_model_parallel_group(self):
        return self.mesh.tp_group

    def get_tensor_model_parallel_world_size(self):
        return self.mesh.dims.tp

    def get_tensor_model_parallel_rank(self):
        return self.mesh.coords.tp

    def get_tensor_model_parallel_src_rank(self):
        return self.mesh.rank_at(tp=0)

    def get_pipeline_model_parallel_world_size(self):
        return self.mesh.dims.pp

    def get_pipeline_model_parallel_group(self):
        return self.mesh.pp_group


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Matrices decay, vectors (norms, biases) do not; empty groups are left out."""
    decay, keep = [], []
    for _, p in named:
        (decay if p.ndim >= 2 else keep).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class ZeroStage:
    """A DeepSpeed ZeRO-1 engine over one pipeline stage's trainable parameters."""

    def __init__(
        self,
        module: nn.Module,
        named_trainable: Sequence[tuple[str, nn.Parameter]],
        mesh: Mesh,
        mp_group: dist.ProcessGroup,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        grad_clip: float,
        bf16: bool,
        micro_batch_rows: int,
        num_micro_batches: int,
    ):
        deepspeed = _import_deepspeed(mesh.device)
        self.names = {id(p): name for name, p in named_trainable}
        self.params = {name: p for name, p in named_trainable}
        optimizer = torch.optim.AdamW(
            param_groups(named_trainable, weight_decay),
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
        )
        config = {
            "train_micro_batch_size_per_gpu": micro_batch_rows,
            "gradient_accumulation_steps": num_micro_batches,
            "train_batch_size": micro_batch_rows * num_micro_batches * mesh.dims.dp,
            "managed_gradient_accumulation": False,
            "zero_optimization": {"stage": 1, "overlap_comm": False},
            "gradient_clipping": grad_clip,
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config=config,
            mpu=_Mpu(mesh, mp_group),
            dist_init_required=False,
        )
        self._init_state()

    def close(self) -> None:
        """Detach this DeepSpeed engine from the module, so another can be built over it (in-place recovery
        rebuilds the engine over re-formed groups): DeepSpeed's destroy removes the optimizer's gradient hooks
        (`contiguous_gradients` registers them even at stage 1) and the parameters' fragment mappings, but not
        the engine's own forward hooks on the module, which would otherwise run beside the new engine's."""
        engine = self.engine
        engine.destroy()
        for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
            handle = getattr(engine, name, None)
            if handle is not None:
                handle.remove()
                setattr(engine, name, None)

    # ------------------------------------------------------------------------------------- training

    def __call__(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, lr: float) -> float:
        """Reduce gradients over dp, clip by the global norm, update. Returns the norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ---------------------------------------------------------------------------------------- state

    def _init_state(self) -> None:
        """Create Adam's state up front (torch would on the first step) so it can be saved or loaded at once."""
        for flat in self.optimizer.single_partition_of_fp32_groups:
            state = self.optimizer.optimizer.state[flat]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(flat)
                state["exp_avg_sq"] = torch.zeros_like(flat)

    def state_numel(self) -> int:
        """Optimizer-state elements held by this rank (master weights; each moment has as many)."""
        return sum(flat.numel() for flat in self.optimizer.single_partition_of_fp32_groups)

    def fragments(self) -> dict[str, Fragment]:
        """Every trainable parameter's fragment on this rank; numel 0 where this rank owns none of it, so all dp
        ranks list the same names."""
        out = {}
        for name, p in self.params.items():
            mapping = getattr(p, "_hp_mapping", None)
            lp = mapping.lp_fragment_address if mapping is not None else None
            out[name] = Fragment(lp.start, lp.numel, p.numel()) if lp else Fragment(0, 0, p.numel())
        return out

    def _views(self, name: str) -> dict[str, torch.Tensor]:
        """Live views of this rank's fragment of the parameter's master weights and moments (empty if none)."""
        mapping = getattr(self.params[name], "_hp_mapping", None)
        if mapping is None:
            empty = torch.empty(0, dtype=torch.float32, device=self.params[name].device)
            return {key: empty for key in STATE_KEYS}
        hp = mapping.hp_fragment_address
        flat = self.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        state = self.optimizer.optimizer.state[flat]
        views = {key: state[key].narrow(0, hp.start, hp.numel) for key in ("exp_avg", "exp_avg_sq")}
        return {"fp32": mapping.hp_fragment, **views}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """{name: {"fp32", "exp_avg", "exp_avg_sq": this rank's 1-D fragment}}: live views, so a copy must be
        staged before the next step, and loading into them in place restores the state (see load_state_dict)."""
        return {name: {key: t.detach() for key, t in self._views(name).items()} for name in self.params}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]], step: int) -> None:
        """Set this rank's fragments from `state` (keyed by parameter name). Each tensor is either the exact
        fragment or the whole flattened local parameter, of which the fragment's range is taken; tensors that
        are the live views themselves (state loaded in place) are left as they are. Then the Adam step is set
        and the weights are refreshed from the fp32 master copies (and all-gathered over dp)."""
        fragments = self.fragments()
        for name in self.params:
            frag, views = fragments[name], self._views(name)
            if name not in state:
                raise KeyError(f"optimizer state: no entry for parameter {name!r}")
            for key, view in views.items():
                if key not in state[name]:
                    raise KeyError(f"optimizer state: {name!r} has no {key!r}")
                value = state[name][key].reshape(-1)
                if value.numel() == frag.total and frag.numel != frag.total:
                    value = value.narrow(0, frag.start, frag.numel)
                if value.numel() != frag.numel:
                    raise ValueError(
                        f"optimizer state: {name!r} {key} has {value.numel()} elements; this rank needs "
                        f"elements [{frag.start}, {frag.start + frag.numel}) of {frag.total}"
                    )
                if frag.numel and value.data_ptr() != view.data_ptr():
                    view.copy_(value)
        for flat in self.optimizer.single_partition_of_fp32_groups:
            self.optimizer.optimizer.state[flat]["step"].fill_(float(step))
        self.optimizer.update_lp_params()

    def refresh_master(self) -> None:
        """Copy the (just loaded) weights into the fp32 master partition."""
        self.optimizer.refresh_fp32_params()
