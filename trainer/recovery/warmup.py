"""A hot spare's warm-up while it waits for an assignment.

What a replacement pays between learning its rank and training is mostly first-time cost, not work: the first
model built in a process took 1.5 s here and the next 0.03 s; the first engine 0.73 s and the next 0.41-0.49 s
(lazy imports, kernel and allocator set-up, DeepSpeed's first initialisation). A spare therefore builds and
trains one step of the smallest model on a private one-rank group before it registers, and throws all of it
away: the real build after the assignment then costs what a second build costs.

Decisions:

- The `tiny` preset, whatever the job's model: the first-time costs are code paths, not sizes, and a spare
  must not hold a second copy of a large model (or its GPU memory) while it waits.
- A one-rank group of the job's backend on an in-process store: the backend's own set-up (gloo's, or CUDA and
  NCCL's) is warmed without touching the job's recovery store, and it is destroyed through `regroup.leave`
  (DeepSpeed's communication layer with it), so nothing of it reaches the round the spare joins.
- A failed warm-up is logged and ignored: it is an optimisation, and the spare's real build reports any real
  problem.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from . import regroup

log = logging.getLogger("trainer.recovery")

WARMUP_TOKENS = 32


def warm_up(backend: str) -> float | None:
    """Build and step a throwaway `tiny` model on a one-rank group; the seconds it took, None if it failed."""
    from trainer.models.qwen2_vl import Qwen2VL, preset
    from trainer.parallel.config import EngineConfig, OptimizerConfig
    from trainer.parallel.engine import ParallelEngine
    from trainer.parallel.mesh import Mesh, ParallelDims

    started = time.monotonic()
    rng = torch.get_rng_state()
    try:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        with torch.device("meta"):
            model = Qwen2VL(preset("tiny"))
        engine = ParallelEngine(
            model,
            Mesh(ParallelDims(dp=1, tp=1, pp=1)),
            EngineConfig(
                optimizer=OptimizerConfig(lr=1e-4, min_lr=0.0, warmup_steps=1, total_steps=2),
                micro_batch_rows=1,
                num_micro_batches=1,
            ),
        )
        ids = torch.randint(0, model.cfg.text.vocab_size // 2, (1, WARMUP_TOKENS))
        engine.train_step([{"input_ids": ids, "labels": ids.clone(), "segment_ids": torch.ones_like(ids)}])
        return time.monotonic() - started
    except Exception as err:  # noqa: BLE001 - an optimisation: the real build reports real problems
        log.warning("spare warm-up failed (%s: %s); going on without it", type(err).__name__, err)
        return None
    finally:
        regroup.leave()
        torch.set_rng_state(rng)
