"""Stager: a CPU snapshot of the training state, so an asynchronous save can write while training goes on.

Decisions:

* Staging copies every tensor (CPU ones too: the optimizer updates parameters in place while the snapshot is
  written) into CPU buffers kept per (group, name) and reused by the next save, so steady-state staging allocates
  nothing. One buffer per tensor, not one per group: a memmove call costs about a microsecond, and 256 KiB
  copies run at the same speed as 512 MiB ones, so fewer, larger copies would save nothing.
* A contiguous CPU tensor is copied with one memmove on the calling thread. torch's copy_ splits a large copy
  over its intra-op threads, which wait for each other: on a host whose cores are also busy (data loader
  workers, the background writer, other processes) that was 4-5x slower than one thread, and one thread already
  copies at memory speed (about 20 GB/s on the 2-core development VM; copy_ made 4 GB/s with the other core
  busy). Other copies (CUDA, non-contiguous, tensor subclasses) use copy_.
* Buffers of CUDA tensors are pinned and filled with non-blocking copies on each device's current stream, which
  is then synchronised (not the whole device: collectives on other streams need not finish): the training
  thread is blocked exactly until the snapshot is complete.
* DTensors and LocalChunks are staged by their local piece and re-wrapped with the same global shape and
  placement (mesh and placements, or offsets), so DCP still writes each rank's own piece under the global
  tensor's name. The wrapper is kept with its buffer and handed out again while the placement is unchanged:
  the runtime builds new LocalChunks for every save, and wrapping thousands of small optimizer fragments anew
  took longer than copying them.
* Memory: one CPU copy of this rank's model and optimizer state while async saving is on.
* Sync saves write from the live tensors, without staging; `trim_storage` only re-seats each contiguous CPU view
  of a larger storage (ZeRO-1 fragments of the flat optimizer buffers) on a storage of exactly its bytes, that
  shares the memory and keeps the larger one alive. DCP clones a tensor whose storage is larger than it before
  writing (torch.save would write the whole storage), so without this a sync save copied the whole optimizer
  state first (a third of the sync save time on bench_checkpoint's state).
"""

from __future__ import annotations

import ctypes
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from trainer.checkpoint.chunk import LocalChunk

State = Mapping[str, Mapping[str, torch.Tensor]]


@dataclass(slots=True)
class _Slot:
    """One tensor's staging buffer and what the last save handed out for it."""

    buffer: torch.Tensor  # contiguous, on the CPU; pinned when the source is on a GPU
    pinned: bool
    placement: Hashable  # None, a LocalChunk's (global shape, offsets) or a DTensor's spec
    staged: torch.Tensor  # the buffer, or the wrapper around it

    def fits(self, local: torch.Tensor) -> bool:
        return (
            self.buffer.dtype == local.dtype
            and self.buffer.shape == local.shape
            and self.pinned == (local.device.type == "cuda")
        )


def _unwrap(tensor: torch.Tensor) -> tuple[torch.Tensor, Hashable]:
    """The rank's local piece and its placement in the global tensor."""
    if isinstance(tensor, LocalChunk):
        return tensor.local, (tensor.shape, tensor.offsets)
    if isinstance(tensor, DTensor):
        return tensor.to_local(), tensor._spec
    return tensor, None


def _wrap(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(like, LocalChunk):
        return LocalChunk(buffer, like.shape, like.offsets)
    if isinstance(like, DTensor):
        # Not DTensor.from_local: it would move the CPU shard back to a CUDA mesh's device. Reusing the spec
        # (mesh, placements, global shape) is how torch's own stager wraps CPU shards.
        return DTensor(buffer, like._spec, requires_grad=False)
    return buffer


def _fast(local: torch.Tensor) -> bool:
    """Whether `local`'s values are exactly the bytes of one CPU memory range."""
    return (
        type(local) in (torch.Tensor, torch.nn.Parameter)  # subclasses may hold their data elsewhere
        and local.device.type == "cpu"
        and local.is_contiguous()
        and not (local.is_conj() or local.is_neg())  # lazy views: the bytes are not the values
    )


def copy_into(buffer: torch.Tensor, local: torch.Tensor) -> None:
    """Fill `buffer` (contiguous, same shape and dtype) from `local`."""
    if _fast(local):
        if local.numel():
            ctypes.memmove(buffer.data_ptr(), local.data_ptr(), buffer.nbytes)  # releases the GIL
        return
    buffer.copy_(local, non_blocking=local.device.type == "cuda")


class Stager:
    def __init__(self) -> None:
        self._slots: dict[tuple[str, str], _Slot] = {}

    @torch.no_grad()
    def stage(self, state: State) -> dict[str, dict[str, torch.Tensor]]:
        """A CPU copy of `state` ({group: {name: tensor}}), complete when this returns. The tensors returned
        are overwritten by the next call: write them out before staging again."""
        staged: dict[str, dict[str, torch.Tensor]] = {}
        slots: dict[tuple[str, str], _Slot] = {}
        devices: set[torch.device] = set()
        for group, tensors in state.items():
            out = staged[group] = {}
            for name, tensor in tensors.items():
                local, placement = _unwrap(tensor)
                slot = self._slots.get((group, name))
                if slot is None or not slot.fits(local):
                    pinned = local.device.type == "cuda"
                    buffer = torch.empty(local.shape, dtype=local.dtype, pin_memory=pinned)
                    slot = _Slot(buffer, pinned, placement, _wrap(buffer, tensor))
                elif slot.placement != placement:
                    slot.placement, slot.staged = placement, _wrap(slot.buffer, tensor)
                copy_into(slot.buffer, local)
                if slot.pinned:
                    devices.add(local.device)
                slots[(group, name)] = slot
                out[name] = slot.staged
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        # Keys the state no longer has would hold (or pin) their memory for nothing.
        self._slots = slots
        return staged


def trim_storage(state: State) -> dict[str, dict[str, torch.Tensor]]:
    """`state` with every contiguous CPU tensor on a storage of exactly its size (the same memory, no copy)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, tensors in state.items():
        out[group] = dict(tensors)
        for name, tensor in tensors.items():
            local, _ = _unwrap(tensor)
            if not _fast(local) or not local.numel() or local.untyped_storage().nbytes() == local.nbytes:
                continue
            start = local.storage_offset() * local.element_size()
            storage = local.untyped_storage()[start : start + local.nbytes]  # a view: holds the whole alive
            trimmed = torch.empty(0, dtype=local.dtype).set_(storage, 0, local.shape)
            out[group][name] = _wrap(trimmed, tensor)
    return out
