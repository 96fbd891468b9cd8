"""The training entry point, run by torchrun on every rank: `python -m trainer.train CONFIG [key.path=value ...]`.

One step on each rank:
1. faults (tests) and the step timer start; the rank's micro-batches of the step come from the loader ("data");
2. the engine runs them through the pipeline (forward, backward), meets every rank at the sync point (the wait
   there is how long this rank waited for the slowest: the straggler signal is the rest), then reduces gradients
   and updates (ZeRO-1);
3. telemetry records the step; a checkpoint is saved when due (asynchronously: training blocks only while the
   state is staged); SIGTERM finishes the step, saves, and exits with EXIT_PREEMPTED.

Resume: the newest valid checkpoint (manifest verified) is loaded before the first step: weights, optimizer
partitions, the loader's position (global, so it survives a change of data-parallel size), RNG states when the
world is the same. Exit codes: 0 done, 2 invalid configuration, EXIT_PREEMPTED after SIGTERM,
EXIT_STORAGE_UNAVAILABLE (74) when no checkpoint could be written for checkpoint.storage_outage_seconds,
anything else a crash.
Running out of host memory (Python's MemoryError, torch's "can't allocate memory") also prints an
`OutOfMemoryError:` line, which the controller classifies as OutOfMemory, as it does torch's own device OOM.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from trainer.contract import EXIT_USER_ERROR
from trainer.contract.telemetry import ENV_LOG_DIR, ENV_RECOVERY_MEMBER
from trainer.contract.training import ConfigError, load_training_config

log = logging.getLogger("trainer.train")


def _single_process_env() -> None:
    """Let `python -m trainer.train` run without torchrun: a world of one on a free local port. (A spare of
    in-place recovery has no RANK: it learns it from its assignment.)"""
    if "RANK" in os.environ or os.environ.get(ENV_RECOVERY_MEMBER):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML or JSON training config")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. training.steps=20 parallel.dp=2")
    args = parser.parse_args(argv)
    # A hung rank's Python stacks on SIGUSR1 (the controller's fallback when py-spy cannot attach).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [rank %(rank)s] %(message)s")
    logging.getLogger().handlers[0].addFilter(_RankFilter())
    try:
        config = load_training_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if member := os.environ.get(ENV_RECOVERY_MEMBER):
        # A spare of in-place recovery (started by torchrun on a spare node, whose own world is that node): it
        # takes a rank of the job's world when it is assigned one. Its member id names it and its local rank.
        os.environ[ENV_RECOVERY_MEMBER] = f"{member}/{os.environ.get('LOCAL_RANK', '0')}"
        os.environ.pop("RANK", None)
        os.environ["WORLD_SIZE"] = str(config.parallel.world_size)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config.parallel.world_size:
        print(
            f"error: parallel: dp x tp x pp = {config.parallel.world_size} but the job has {world} processes",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    _single_process_env()
    from trainer.runtime import Run

    try:
        with Run(config) as run:
            return run.train()
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, MemoryError) or "can't allocate memory" in str(err):
            # Host memory: name it the way the controller's out-of-memory rule reads (controller/failures.py),
            # so the attempt fails as OutOfMemory rather than as an anonymous crash.
            print(
                f"OutOfMemoryError: host memory exhausted on rank {os.environ.get('RANK', '0')}",
                file=sys.stderr,
            )
        raise


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")
        return True


def _record_exit(code: int) -> None:
    """Say that this rank ends on purpose, with `code` (see ENV_LOG_DIR); best effort."""
    if folder := os.environ.get(ENV_LOG_DIR):
        with contextlib.suppress(OSError):
            (Path(folder) / f"exit-{os.getpid()}").write_text(str(code))


if __name__ == "__main__":
    exit_code = main()
    _record_exit(exit_code)
    sys.exit(exit_code)
