"""The cost model: what each phase of a failure and of normal training takes, at a given job size.

The small-scale numbers are vlctl's own measurements (docs/benchmarks.md, `bench_recovery` run E: 2 nodes x 1
rank, the mini model, 2 CPU cores); the terms that grow with the job are stated assumptions, each a field here
(so a spec's `cost_model:` section overrides it) and in docs/scale.md. With G GPUs on N nodes and a training
state of S bytes (14 bytes a parameter: bf16 weights, fp32 master weights, two fp32 Adam moments):

    launch         = launch_s + schedule_s + comm_init_s_per_gpu x G
    checkpoint load = S / min(N x node_read_gbps, storage_read_gbps) + load_s
    checkpoint save (blocking part) = stage_s + S / G / d2h_gbps        (async save: only the copy to host blocks)
    first step     = step x (1 + first_step_extra_steps)
    in-place regroup = regroup_s + comm_init_s_per_gpu x G              (new communicators over the whole world)
    in-place restore = restore_s + S / N / replica_gbps                  (the lost node's share, from its peer)
    a new spare    = schedule_s + launch_s

Decisions:

- Detection depends on how the failure is seen: a rank that exits is seen within a second (torchrun's monitor
  and one controller poll, measured); a node that disappears silently is seen after `node_lost_detect_s` (a
  heartbeat or a collective's error, assumed); a hang after the controller's own hang timeout (the spec's, not a
  cost); planned maintenance at once.
- Backoff is not a cost: it is the controller's own restart policy, computed by it.
- In-place recovery slows every step by `snapshot_overhead` (the snapshot's copy and its replica's transfer).
  Measured +4.9% here on 2 CPU cores, where the copy competes with training for the cores; the default assumes
  a GPU node, where the copy is a DMA overlapped with compute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BYTES_PER_PARAM = 14.0  # bf16 weights 2 + fp32 master 4 + Adam m, v 8
GB = 1e9


class CostModelError(ValueError):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class CostModel:
    # Measured (bench_recovery run E, medians of 3).
    crash_detect_s: float = 0.86  # restart path: a rank's exit to the controller's verdict
    inplace_detect_s: float = 0.27  # in place: a rank process gone to the controller's decision
    teardown_s: float = 0.85  # the survivors fail fast in their collective
    launch_s: float = 5.01  # interpreter, torch and DeepSpeed imports, rendezvous of 2 nodes
    load_s: float = 0.22  # the mini model's checkpoint, read and verified
    first_step_extra_steps: float = 1.77  # first step 2.16 s against 0.78 s steady
    inplace_first_step_extra_steps: float = 0.27  # 0.99 s against 0.78 s
    regroup_s: float = 0.010
    restore_s: float = 0.69
    # Assumed, at scale.
    node_lost_detect_s: float = 60.0  # a node gone without an exit status
    schedule_s: float = 60.0  # pods placed and started, images cached
    comm_init_s_per_gpu: float = 0.002  # NCCL communicators and rendezvous, linear in ranks
    node_read_gbps: float = 5.0  # per node, from the checkpoint store
    storage_read_gbps: float = 2000.0  # the store's aggregate
    stage_s: float = 0.5  # the blocking part of an async save, besides the copy
    d2h_gbps: float = 25.0  # device to host copy, per GPU
    replica_gbps: float = 25.0  # a node's snapshot replica, peer to peer
    snapshot_overhead: float = 0.02  # in-place: each step's extra time for its snapshot

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                raise CostModelError(f"cost_model.{f.name}: expected a number >= 0, got {value!r}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> CostModel:
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in known:
                raise CostModelError(f"cost_model.{key}: unknown field")
        return cls(**raw)

    def at(self, *, nodes: int, gpus_per_node: int, params_billion: float, step_seconds: float) -> Costs:
        gpus = nodes * gpus_per_node
        state = params_billion * 1e9 * BYTES_PER_PARAM
        return Costs(
            crash_detect_s=self.crash_detect_s,
            inplace_detect_s=self.inplace_detect_s,
            node_lost_detect_s=self.node_lost_detect_s,
            teardown_s=self.teardown_s,
            launch_s=self.launch_s + self.schedule_s + self.comm_init_s_per_gpu * gpus,
            load_s=self.load_s + state / (min(nodes * self.node_read_gbps, self.storage_read_gbps) * GB),
            save_s=self.stage_s + state / gpus / (self.d2h_gbps * GB),
            first_step_extra_s=self.first_step_extra_steps * step_seconds,
            inplace_first_step_extra_s=self.inplace_first_step_extra_steps * step_seconds,
            regroup_s=self.regroup_s + self.comm_init_s_per_gpu * gpus,
            restore_s=self.restore_s + state / nodes / (self.replica_gbps * GB),
            spare_start_s=self.schedule_s + self.launch_s,
            snapshot_overhead=self.snapshot_overhead,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Costs:
    """The cost model evaluated at one job size, in seconds."""

    crash_detect_s: float
    inplace_detect_s: float
    node_lost_detect_s: float
    teardown_s: float
    launch_s: float
    load_s: float
    save_s: float  # blocking, per checkpoint (w)
    first_step_extra_s: float
    inplace_first_step_extra_s: float
    regroup_s: float
    restore_s: float
    spare_start_s: float
    snapshot_overhead: float

    def detect_s(self, seen_as: str, *, in_place: bool) -> float:
        if seen_as == "node_lost":
            return self.node_lost_detect_s
        if seen_as == "crash":
            return self.inplace_detect_s if in_place else self.crash_detect_s
        return 0.0  # planned: the node's drain is announced; hang: the controller's own timer

    def restart_fixed_s(self, *, detect_s: float, backoff_s: float) -> float:
        """u0 of the analytic model on the restart path: everything but the recomputed steps."""
        return detect_s + self.teardown_s + backoff_s + self.launch_s + self.load_s + self.first_step_extra_s
