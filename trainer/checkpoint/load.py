"""Resume: find the newest step that verifies on every rank and load it into the runtime's tensors.

Decisions:

* Nothing is read before its manifest verifies. The ranks split the files among themselves (rank r checks
  every world_size-th file from r), so a "checksum" resume reads each byte once per job, not once per rank;
  one all_gather tells everyone whether any rank found a bad file. A bad step is skipped with a warning naming
  the step and the file, and the next older one is tried. Loading an explicitly named step that fails raises.
* DCP loads in place into the tensors handed over (model and optimizer, same names and global shapes as at
  save time), reading for each DTensor exactly the slice the current mesh gives this rank: that is what makes
  a checkpoint written at one data-parallel size load at another.
* Per-rank state (rank-00003.pt) goes back to the rank that wrote it when the world size is unchanged. After a
  world-size change there is no such pairing; `per_rank` is None and `read_rank_state` reads any rank's file,
  so the runtime can rebuild e.g. its data-loader positions from all of them.
* torch.load(weights_only=True) only: rank files hold plain types and tensors. (DCP reads its own `.metadata`
  with pickle; it is covered by the manifest's size and, with verify="checksum", CRC-32.)
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from trainer.checkpoint.group import CheckpointGroup
from trainer.checkpoint.storage import CheckpointStore
from trainer.contract.checkpoint import (
    CheckpointMeta,
    StepInfo,
    VerifyMode,
    join,
    list_checkpoints,
    rank_filename,
    read_meta,
    verify,
)

log = logging.getLogger(__name__)

# DCP warns on every call without a process group that it assumes a single process: that is our intent.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded."""


@dataclass(frozen=True, slots=True)
class Restored:
    step: int
    tokens_seen: int
    uri: str  # the step folder
    meta: CheckpointMeta  # layout at save time, scheduler state, training config, extra
    per_rank: dict[str, Any] | None  # this rank's saved state; None after a world-size change


def verify_everywhere(group: CheckpointGroup, store: CheckpointStore, step_uri: str, mode: VerifyMode) -> str:
    """Verify a step with the ranks splitting the files; the first problem any rank found, or ""."""
    mine = verify(
        step_uri, mode=mode, part=(group.rank, group.world_size), storage_options=store.storage_options
    )
    return next((p for p in group.all_gather(mine.problem) if p), "")


def find_latest(group: CheckpointGroup, store: CheckpointStore, mode: VerifyMode) -> StepInfo | None:
    """The newest committed step that verifies, the same on every rank."""
    listed = list_checkpoints(store.uri, storage_options=store.storage_options) if group.rank == 0 else None
    for info in reversed(group.broadcast(listed)):
        problem = verify_everywhere(group, store, info.uri, mode)
        if not problem:
            return info
        if group.rank == 0:
            log.warning("checkpoint step %d is invalid, falling back to an older one: %s", info.step, problem)
    return None


def read_rank_state(step_uri: str, rank: int, *, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The per-rank state `rank` saved in a step (RNG, data loader, ...)."""
    store = CheckpointStore(step_uri, storage_options)
    with store.fs.open(join(store.root, rank_filename(rank)), "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_step(
    group: CheckpointGroup,
    store: CheckpointStore,
    info: StepInfo,
    *,
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, torch.Tensor],
    verified: bool = False,
    mode: VerifyMode = "size",
) -> Restored:
    """Load one step into `model` and `optimizer` (in place); raise CheckpointError if it does not verify."""
    if not verified and (problem := verify_everywhere(group, store, info.uri, mode)):
        raise CheckpointError(f"checkpoint step {info.step} is invalid: {problem}")
    state = {"model": dict(model), "optimizer": dict(optimizer)}
    try:
        dcp.load(
            state, storage_reader=store.dcp_reader(info.uri), process_group=group.pg, no_dist=group.pg is None
        )
    except Exception as e:  # DCP raises on every rank when any rank fails
        raise CheckpointError(f"checkpoint step {info.step}: {type(e).__name__}: {e}") from e
    meta = read_meta(info.uri, storage_options=store.storage_options)
    same_world = meta["layout"]["world_size"] == group.world_size
    per_rank = (
        read_rank_state(info.uri, group.rank, storage_options=store.storage_options) if same_world else None
    )
    return Restored(
        step=meta["step"], tokens_seen=meta["tokens_seen"], uri=info.uri, meta=meta, per_rank=per_rank
    )


def restore(
    group: CheckpointGroup,
    store: CheckpointStore,
    *,
    model: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, torch.Tensor],
    mode: VerifyMode,
    step: int | None = None,
) -> Restored | None:
    """Load `step`, or the newest valid step when None; None when the root holds no valid checkpoint."""
    if step is None:
        info = find_latest(group, store, mode)
        if info is None:
            return None
        return load_step(group, store, info, model=model, optimizer=optimizer, verified=True)
    info = StepInfo(step=step, uri=store.step_uri(step))
    return load_step(group, store, info, model=model, optimizer=optimizer, mode=mode)
