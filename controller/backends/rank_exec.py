"""`python -m controller.backends.rank_exec LOG_DIR MODULE [ARGS ...]`: the first thing each rank runs.

torchrun starts this in place of the training module. It points the process's stdout and stderr at
`LOG_DIR/rank-<RANK>.log` (RANK is the global rank torchrun set; LOG_DIR `-`: left alone, as in a pod whose
output is its log) and then execs `python -m MODULE ARGS`.

Decisions:

- exec, not a child: the rank keeps the pid torchrun knows, so signals (SIGTERM, SIGSTOP from a chaos test,
  SIGUSR1 for a stack dump) reach the trainer itself, and there is no extra process to leave behind.
- Per-rank files named by global rank, rather than torchrun's `--log-dir` tree (named by local rank, split
  into stdout and stderr, laid out differently across torch versions): `vlctl logs JOB --rank N` opens one file.
- Append, so a rank's log survives a re-exec within the attempt; each attempt has its own LOG_DIR.
- Standard library only: it runs once per rank at start-up, before the trainer's own imports.
- A memory limit (ENV_MEMORY_LIMIT, bytes) becomes the rank's RLIMIT_DATA before the exec, which keeps it: an
  allocation past it fails in the rank (MemoryError, named OutOfMemory by the controller) rather than taking
  the machine down. RLIMIT_DATA, not RLIMIT_AS: address space that is only reserved does not count. Jobs on
  GPUs get no limit (`controller.memory.rank_memory_limit`) until a GPU run shows what CUDA needs under it.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

ENV_MEMORY_LIMIT = "VLCTL_RANK_MEMORY_LIMIT"
ENV_RECOVERY_MEMBER = "VLCTL_RECOVERY_MEMBER"  # trainer.contract.telemetry's: standard library only here
ENV_LOG_DIR = "VLCTL_LOG_DIR"  # trainer.contract.telemetry's too
# In-place recovery runs each node under a torchrun of its own, whose RANK and WORLD_SIZE are the node's: the
# node's first global rank and the job's world size come from these, and become the rank's RANK and WORLD_SIZE.
ENV_RANK_BASE = "VLCTL_RANK_BASE"
ENV_WORLD_SIZE = "VLCTL_WORLD_SIZE"


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        print("usage: python -m controller.backends.rank_exec LOG_DIR MODULE [ARGS ...]", file=sys.stderr)
        sys.exit(2)
    log_dir, module, *args = argv
    if (base := os.environ.get(ENV_RANK_BASE)) is not None:  # a node of its own torchrun (in-place recovery)
        os.environ["RANK"] = str(int(base) + int(os.environ.get("LOCAL_RANK", "0")))
        os.environ["WORLD_SIZE"] = os.environ[ENV_WORLD_SIZE]
    if log_dir != "-":  # `-`: the output stays torchrun's (a pod's, which `kubectl logs` reads)
        _redirect(log_dir)
    if limit := os.environ.get(ENV_MEMORY_LIMIT):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = int(limit) if hard == resource.RLIM_INFINITY else min(int(limit), hard)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


def _redirect(log_dir: str) -> None:
    if member := os.environ.get(ENV_RECOVERY_MEMBER):  # a hot spare: no rank of the job's yet
        path = Path(log_dir) / f"spare-{member}-{os.environ.get('LOCAL_RANK', '0')}.log"
    else:
        path = Path(log_dir) / f"rank-{os.environ.get('RANK', '0')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ[ENV_LOG_DIR] = log_dir
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1:])
