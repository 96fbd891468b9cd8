"""The parallel engine's training state as a snapshot holds it, and its restore after the groups were re-formed.

A snapshot takes the engine's live tensors (this rank's model shard and its ZeRO-1 fragments of the fp32 master
weights and both Adam moments, by parameter name), the same pieces a checkpoint writes, without the LocalChunk
wrappers a checkpoint needs to reshard: a snapshot is restored at the same place in the same layout, never
resharded. Restoring copies into the live tensors of the (rebound or newly built) engine and then completes the
load as an in-place checkpoint load does: the Adam step, and the weights from the restored master copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .snapshot import RankSnapshots, State

if TYPE_CHECKING:
    from trainer.parallel.engine import ParallelEngine

ENGINE_STEP = "engine_step"  # meta key: the optimizer updates done, which the schedule follows


def engine_state(engine: ParallelEngine) -> State:
    """{"model": {name: shard}, "optim": {"<name>.<fp32|exp_avg|exp_avg_sq>": fragment}}: live tensors."""
    optim = {
        f"{name}.{key}": tensor
        for name, tensors in engine.optimizer_state_dict()["state"].items()
        for key, tensor in tensors.items()
    }
    return {"model": engine.model_state_dict(), "optim": optim}


def engine_meta(engine: ParallelEngine) -> dict[str, Any]:
    return {ENGINE_STEP: engine.step}


def restore_engine(engine: ParallelEngine, snapshots: RankSnapshots, *, step: int) -> Mapping[str, Any]:
    """Put the engine back to its snapshot of `step` (collective: the weights are re-derived and all-gathered
    over dp); returns the snapshot's meta for the rest of the run's state (data position, RNGs)."""
    meta = snapshots.restore(engine_state(engine), step=step)
    engine.load_optimizer_state_dict(
        {"step": meta[ENGINE_STEP], "state": engine.optimizer_state_dict()["state"]}
    )
    return meta
