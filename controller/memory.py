"""The submit-time memory check: a job whose ranks cannot fit in the memory they get is refused before it runs.

The estimate is `trainer.contract.memory.estimate_rank_memory` (what it counts is in its docstring; it errs
low, so a refusal is certain; under `recovery: in-place` it counts the rank's snapshots, its own and its peer's,
double-buffered, and on the local backend the hot spares' processes count as ranks). It is compared with:

- `resources.memory` when the spec declares it: the memory of one node, shared by its `procs_per_node` ranks;
- else, on the local backend, this machine's memory (the smaller of physical memory and the cgroup's limit):
  every rank of every node runs here.

A Kubernetes job without `resources.memory` is not checked: its nodes are not known at submit.

What slips through (the estimate errs low: pixels, video frames and vision activations are not counted) meets a
limit at run time. A pod has its container's memory limit (the kubelet reports OOMKilled). A local rank gets
RLIMIT_DATA from `rank_memory_limit` (its share of the node's declared memory, or of this machine's), so a
runaway allocation fails inside the rank as a MemoryError, which the trainer and the failure rules name
OutOfMemory, instead of swapping the machine or meeting the kernel's OOM killer, whose SIGKILL reads as a crash.
"""

from __future__ import annotations

import os
from pathlib import Path

from controller.quantity import quantity_bytes
from trainer.contract.memory import estimate_rank_memory, human_bytes

_ADVICE = {
    "training.data.rows_per_step": "lower it (a rank holds all its rows of a step at once) or raise parallel.dp",
    "training.data.micro_batch_rows": "lower it or data.row_len, or recompute activations "
    "(training.model.checkpoint_text_layers)",
    "training.model.name": "use a smaller model, more model-parallel ranks (parallel.tp, parallel.pp), "
    "ZeRO-1 over more data-parallel ranks, or GPUs",
    "fault_tolerance.recovery": "use recovery: restart, or more data-parallel ranks (a snapshot is the rank's "
    "ZeRO-1 share of the optimizer state, held 4 times: its own and its peer's, each double-buffered)",
}
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class MemoryCheckError(ValueError):
    """The job does not fit; the message is one line naming the field to change."""


def host_memory_bytes() -> int:
    """This machine's memory for our processes: physical memory, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_LIMITS:
        try:
            limit = path.read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def check_memory(spec) -> None:
    """Raise MemoryCheckError when a rank of `spec` (a TrainingJobSpec) cannot fit in the memory it gets."""
    r = spec.resources
    in_place = spec.fault_tolerance.recovery == "in-place"
    need = estimate_rank_memory(spec.training, on_gpu=r.gpus_per_node > 0, in_place=in_place)
    if r.memory is not None:
        try:
            have = quantity_bytes(r.memory)
        except ValueError as err:
            raise MemoryCheckError(f"resources.memory: {err}") from None
        ranks, where = r.procs_per_node, f"a node (resources.memory = {r.memory})"
    elif spec.backend == "local":
        # A hot spare's processes build the same state as a rank's before they are given one.
        spares = spec.fault_tolerance.hot_spares * r.procs_per_node if in_place else 0
        have, ranks, where = host_memory_bytes(), r.world_size + spares, "this machine"
    else:
        return
    if need.total * ranks > have:
        raise MemoryCheckError(
            f"{need.field}: each rank needs at least {human_bytes(need.total)} ({need.describe()}); "
            f"{ranks} rank(s) on {where} need {human_bytes(need.total * ranks)}, more than its "
            f"{human_bytes(have)}; {_ADVICE[need.field]}"
        )


RANK_LIMIT_HEADROOM = 0.9  # of a local machine's memory: the controller, the agents and the OS keep the rest


def rank_memory_limit(spec) -> int | None:
    """Bytes of private writable memory (RLIMIT_DATA) each rank of a local job may map: its share of the
    declared node memory, else an equal share of 90% of this machine's. None for other backends (their pods
    have a memory limit of their own), for a declared quantity that does not parse (refused at submit), and for
    jobs on GPUs: the CUDA runtime and pinned host buffers map writable memory of their own, and no GPU run has
    yet shown what a rank needs under the limit."""
    r = spec.resources
    if spec.backend != "local" or r.gpus_per_node > 0:
        return None
    if r.memory is not None:
        try:
            return quantity_bytes(r.memory) // r.procs_per_node
        except ValueError:
            return None
    return int(host_memory_bytes() * RANK_LIMIT_HEADROOM) // r.world_size
