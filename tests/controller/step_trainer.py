"""A stand-in for `trainer.train` that keeps everything the controller sees and drops the model: for tests that
need hundreds of steps (stragglers) or many attempts (crash loops) in seconds.

Run by the local backend exactly like the trainer (torchrun, rank_exec, per-rank logs) with the attempt's config
file: it joins the gloo process group, and each step does a fixed amount of CPU work (a busy loop, so a rank
stopped by SIGSTOP from outside takes longer, as a slow GPU would), meets the other ranks at the trainer's own
sync point and all-reduces a "gradient", with the trainer's real telemetry (StepTimer phases, JSONL lines,
Prometheus endpoint). Steps run until `training.steps`.

Environment knobs for tests: STEP_TRAINER_WORK (busy-loop iterations per step, default 60000),
STEP_TRAINER_RAISE=1 (raise before the first step, like a bad import or a missing file), STEP_TRAINER_SLOW_FILE
(a path: once a test writes `{"rank": R, "factor": F}` there, rank R's compute takes F times as long from its
next step on, and it prints `slowed from step N` to its log). The slow rank waits (F - 1) times each busy loop's
own duration after it, as a host waits for a GPU that became F times slower: the ratio stays F on a machine whose
cores other processes keep busy, where F times the CPU work would not (while the fast rank waits in its
collective, the slow one gets a larger share of the cores).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.contract.training import load_training_config
from trainer.telemetry.rank import RankTelemetry, TelemetryConfig
from trainer.telemetry.timers import sync_point


def busy(iterations: int, factor: float = 1.0) -> float:
    start = time.perf_counter()
    x = 0.0
    for i in range(iterations):
        x += (i % 7) * 1e-9
    if factor > 1.0:
        time.sleep((factor - 1.0) * (time.perf_counter() - start))
    return x


def main(argv: list[str]) -> int:
    config = load_training_config(argv[0], argv[1:])
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")
    try:
        if os.environ.get("STEP_TRAINER_RAISE") == "1":
            raise RuntimeError("step trainer: failing before the first step, as asked")
        work = int(os.environ.get("STEP_TRAINER_WORK", "60000"))
        telemetry = RankTelemetry.from_env(
            TelemetryConfig.from_env(os.environ, host="127.0.0.1", port=0, jsonl=True, log_every=0),
            run_dir=run_dir,
        )
        grad = torch.zeros(1024)
        slow_file = os.environ.get("STEP_TRAINER_SLOW_FILE")
        factor = 1.0
        for step in range(config.training.steps):
            if slow_file and factor == 1.0 and os.path.exists(slow_file):
                order = json.loads(Path(slow_file).read_text())
                if order["rank"] == dist.get_rank():
                    factor = float(order["factor"])
                    print(f"slowed from step {step}", flush=True)
            telemetry.start_step(step)
            with telemetry.timer.phase("data"):
                busy(work // 10, factor)
            with telemetry.timer.phase("forward"):
                busy(work // 2, factor)
            with telemetry.timer.phase("backward"):
                busy(work - work // 2 - work // 10, factor)
            sync_point(telemetry.timer)
            with telemetry.timer.collective():
                dist.all_reduce(grad)
            with telemetry.timer.phase("optimizer"):
                grad.mul_(0.5)
            telemetry.micro_step_done()
            telemetry.end_step(loss=1.0 / (step + 1), text_tokens=256)
        telemetry.close()
        print(json.dumps({"done": config.training.steps}), flush=True)
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
