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
    """{"model": {name: shard}, "optim": {"<name>.<fp32|exp_avg|exp_avg_sq>": fragment}}: live tensors.

    The trained weights are left out of "model": the restore re-derives them from the fp32 master fragments (the
    load's last part, all-gathered over dp), exactly as they were derived after the step the snapshot took, so
    copying and replicating them every step would only double the traffic (for the mini model under dp=2,
    196 MB of a rank's snapshot were 80 MB of weights). The frozen ones stay: no optimizer holds them, and a
    newcomer's may differ from the job's (loaded from a checkpoint of an earlier stage)."""
    trained = engine.optimizer_state_dict()["state"]
    optim = {f"{name}.{key}": tensor for name, tensors in trained.items() for key, tensor in tensors.items()}
    model = {name: t for name, t in engine.model_state_dict().items() if name not in trained}
    return {"model": model, "optim": optim}


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
