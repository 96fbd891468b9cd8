"""Stager: a CPU snapshot of the training state, so an asynchronous save can write while training goes on.

Decisions:

* Staging copies every tensor (CPU ones too: the optimizer updates parameters in place while the snapshot is
  written) into CPU buffers that are kept and reused by the next save, so steady-state staging allocates
  nothing. Buffers of CUDA tensors are pinned and filled with non-blocking copies, then one synchronize: the
  training thread is blocked exactly until the snapshot is complete.
* DTensors and LocalChunks are staged by their local piece and re-wrapped with the same global shape and
  placement (mesh and placements, or offsets), so DCP still writes each rank's own piece under the global
  tensor's name.
* Memory: one CPU copy of this rank's model and optimizer state while async saving is on.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed.tensor import DTensor

from trainer.checkpoint.chunk import LocalChunk

State = Mapping[str, Mapping[str, torch.Tensor]]


class Stager:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def _buffer(self, key: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
            self._buffers[key] = buf
        return buf

    @torch.no_grad()
    def stage(self, state: State) -> dict[str, dict[str, torch.Tensor]]:
        """A CPU copy of `state` ({group: {name: tensor}}), complete when this returns."""
        staged: dict[str, dict[str, torch.Tensor]] = {}
        on_cuda = False
        for group, tensors in state.items():
            out = staged[group] = {}
            for name, tensor in tensors.items():
                if isinstance(tensor, LocalChunk):
                    local = tensor.local
                elif isinstance(tensor, DTensor):
                    local = tensor.to_local()
                else:
                    local = tensor
                buf = self._buffer((group, name), local)
                buf.copy_(local, non_blocking=local.is_cuda)
                on_cuda |= local.is_cuda
                if isinstance(tensor, LocalChunk):
                    buf = LocalChunk(buf, tensor.shape, tensor.offsets)
                elif isinstance(tensor, DTensor):
                    # Not DTensor.from_local: it would move the CPU shard back to a CUDA mesh's device. Reusing
                    # the spec (mesh, placements, global shape) is how torch's own stager wraps CPU shards.
                    buf = DTensor(buf, tensor._spec, requires_grad=False)
                out[name] = buf
        if on_cuda:
            torch.cuda.synchronize()
        # Keys the state no longer has would pin their memory for nothing.
        live = {(g, n) for g, tensors in state.items() for n in tensors}
        for key in set(self._buffers) - live:
            del self._buffers[key]
        return staged
