"""LocalChunk: this rank's rectangular piece of a global tensor, for splits that DTensor cannot describe.

DCP saves each rank's piece under the global tensor's name with its offsets, and on load reads, for each piece a
rank asks for, the overlapping parts of whatever pieces were saved: any split can load any other. DTensor gives
DCP such pieces for even Shard/Replicate placements; two splits in this project are not of that form:

* ZeRO-1 (DeepSpeed) gives each data-parallel rank an arbitrary range [start, start + numel) of each flattened
  parameter's fp32 master and Adam moments: `LocalChunk(view, (total,), (start,))`.
* The ViT's fused qkv is tensor-parallel split per third (q, k, v): its shard is one chunk of the parameter
  seen as (3, rows / 3, cols), which trainer.parallel's `ParamLayout.blocked` returns.

Decisions:

* A wrapper tensor subclass (its shape is the global shape) implementing DCP's `_Checkpointable` protocol
  (`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`), the hook torch provides for tensor
  types that DTensor does not cover. It supports no tensor operations: it exists only to be saved or loaded into,
  and any other use fails loudly instead of computing on a tensor that holds only part of its elements.
* Loading writes into `local` in place, so a chunk wrapping the runtime's live buffer (DeepSpeed's partition
  view) restores it without a copy. An empty piece (a rank that owns nothing of a parameter) is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType


class LocalChunk(torch.Tensor):
    local: torch.Tensor
    offsets: tuple[int, ...]

    @staticmethod
    def __new__(cls, local: torch.Tensor, global_shape: Sequence[int], offsets: Sequence[int]) -> LocalChunk:
        shape, offsets = tuple(int(s) for s in global_shape), tuple(int(o) for o in offsets)
        if not (len(shape) == len(offsets) == local.dim()) or any(
            o < 0 or o + n > s for o, n, s in zip(offsets, local.shape, shape, strict=True)
        ):
            raise ValueError(
                f"LocalChunk: a piece of shape {tuple(local.shape)} at offsets {offsets} does not fit in {shape}"
            )
        out = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=local.dtype, device=local.device)
        out.local, out.offsets = local, offsets
        return out

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __repr__(self) -> str:
        return (
            f"LocalChunk(shape={tuple(self.shape)}, offsets={self.offsets}, local={tuple(self.local.shape)})"
        )

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TypeError(f"LocalChunk supports no tensor operations ({func}); use .local")

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.shape)

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        if self.local.numel() == 0:
            return []
        data = TensorWriteData(
            chunk=self._chunk(), properties=TensorProperties.create_from_tensor(self.local), size=self.shape
        )
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(self.offsets)), type=WriteItemType.SHARD, tensor_data=data
            )
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()] if self.local.numel() else []

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local
