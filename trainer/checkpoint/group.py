"""CheckpointGroup: the ranks that save together, on their own gloo process group.

Decisions:

* A dedicated gloo group, created once per Checkpointer: an asynchronous save runs its collectives (DCP's
  planning, gathering checksums, the commit decision) in a background thread, and collectives of two threads
  on one group could interleave differently on different ranks and deadlock. Gloo also works for CUDA
  training (NCCL on the training group): only small Python objects travel here.
* Its timeout bounds how long a save waits for a dead or stuck rank before it fails (and commits nothing).
* Without torch.distributed (one process) every collective is the identity.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist


class CheckpointGroup:
    def __init__(self, *, timeout_s: float) -> None:
        """Collective over the whole job when torch.distributed is initialized: call on every rank, at the
        same point relative to other new_group calls."""
        if dist.is_available() and dist.is_initialized():
            self.pg: dist.ProcessGroup | None = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=timeout_s)
            )
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
        else:
            self.pg, self.rank, self.world_size = None, 0, 1

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.pg is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0, in rank order; None elsewhere."""
        if self.pg is None:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.pg)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if self.pg is None:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.pg)
        return out
