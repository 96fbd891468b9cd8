"""The dp x pp x tp device mesh: sizes, rank layout, process groups, and the gloo/NCCL choice.

Decisions:

- Rank layout: tp varies fastest, then dp, then pp (rank = tp + tp_size * (dp + dp_size * pp)), as in
  Megatron. Tensor-parallel peers are consecutive ranks, so they share a node and its NVLink for their per-layer
  all-reduces; pipeline stages, which exchange one activation per micro-batch, are the furthest apart.
- The groups come from a torch DeviceMesh named ("pp", "dp", "tp"), which DTensor and distributed checkpointing
  can use as is. The "model-parallel" group (every rank of one data-parallel replica: all stages, all tp ranks)
  is made here too, since DeepSpeed's gradient norm is all-reduced over it.
- Backend: NCCL when CUDA is available, gloo otherwise. The process group is initialised from the torchrun
  environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); its size must equal dp * pp * tp.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp", "tp")


class Coords(NamedTuple):
    dp: int
    pp: int
    tp: int


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelDims:
    dp: int = 1  # data-parallel replicas (ZeRO-1 shards the optimizer state over them)
    tp: int = 1  # tensor-parallel ranks per stage
    pp: int = 1  # pipeline stages

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank: must be in [0, {self.world_size}), got {rank}")
        return Coords(dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp), tp=rank % self.tp)

    def rank_of(self, *, dp: int, pp: int, tp: int) -> int:
        for name, value, size in (("dp", dp, self.dp), ("pp", pp, self.pp), ("tp", tp, self.tp)):
            if not 0 <= value < size:
                raise ValueError(f"{name}: must be in [0, {size}), got {value}")
        return tp + self.tp * (dp + self.dp * pp)

    def group_ranks(self, dim: str) -> list[list[int]]:
        """Every group along one mesh dimension ("dp", "tp", "pp", or "mp" for all stages and tp ranks of one
        data-parallel replica), each as its sorted global ranks."""
        groups: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = {
                "dp": (c.pp, c.tp),
                "tp": (c.dp, c.pp),
                "pp": (c.dp, c.tp),
                "mp": (c.dp,),
            }.get(dim)
            if key is None:
                raise ValueError(f"dim: must be one of dp, tp, pp, mp, got {dim!r}")
            groups.setdefault(key, []).append(rank)
        return list(groups.values())


class Mesh:
    """This rank's place in the mesh and its process groups. Build it on every rank (group creation is
    collective), after the default process group exists; see `init_distributed`."""

    def __init__(self, dims: ParallelDims):
        if not dist.is_initialized():
            raise RuntimeError("Mesh: torch.distributed is not initialised (call init_distributed)")
        if dist.get_world_size() != dims.world_size:
            raise ValueError(
                f"dims: dp*tp*pp = {dims.dp}*{dims.tp}*{dims.pp} = {dims.world_size}, "
                f"but the world has {dist.get_world_size()} processes"
            )
        self.dims = dims
        self.rank = dist.get_rank()
        self.coords = dims.coords(self.rank)
        self.backend = dist.get_backend()
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )
        self.device_mesh: DeviceMesh = init_device_mesh(
            self.device.type, (dims.pp, dims.dp, dims.tp), mesh_dim_names=MESH_DIMS
        )
        self.dp_group = self.device_mesh.get_group("dp")
        self.tp_group = self.device_mesh.get_group("tp")
        self.pp_group = self.device_mesh.get_group("pp")
        self.mp_group = self.new_group_per(dims.group_ranks("mp"))
        assert self.mp_group is not None

    def new_group_per(self, ranks_per_group: list[list[int]]) -> dist.ProcessGroup | None:
        """Create groups collectively (every rank must call with the same lists); returns this rank's group, or
        None when it is in none."""
        mine, _ = dist.new_subgroups_by_enumeration(ranks_per_group)
        return mine

    def rank_at(self, *, dp: int | None = None, pp: int | None = None, tp: int | None = None) -> int:
        """The global rank at the given coordinates, the missing ones taken from this rank's."""
        c = self.coords
        return self.dims.rank_of(
            dp=c.dp if dp is None else dp, pp=c.pp if pp is None else pp, tp=c.tp if tp is None else tp
        )

    @property
    def stage(self) -> int:
        return self.coords.pp

    @property
    def is_first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coords.pp == self.dims.pp - 1

    def __repr__(self) -> str:
        c = self.coords
        return f"Mesh(rank={self.rank}, dp={c.dp}/{self.dims.dp}, pp={c.pp}/{self.dims.pp}, tp={c.tp}/{self.dims.tp})"


def init_distributed(dims: ParallelDims, *, backend: str | None = None, timeout_s: float = 600.0) -> Mesh:
    """Initialise torch.distributed from the torchrun environment (if not done yet) and build the mesh.

    NCCL binds each process to GPU LOCAL_RANK first. Always pair with `destroy_distributed()` before exit: a
    process that exits with a live process group can abort in the backend's teardown.
    """
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"backend: must be 'nccl' or 'gloo', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    mesh = Mesh(dims)
    # One collective over everyone: NCCL creates its communicator here rather than inside the first p2p call.
    dist.barrier()
    return mesh


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
