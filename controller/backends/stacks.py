"""Dump every rank's Python stacks into its log: what hang handling does before it kills a stuck gang.

Decisions:

- py-spy first (`py-spy dump --pid`): it reads the stacks from outside, so it works on a rank stuck anywhere,
  even in C code or with the GIL held, and needs nothing from the trainer. It needs ptrace rights over the rank
  (same user, and no Yama restriction or container policy against it); a failure falls through to the next way.
- Otherwise SIGUSR1, only to a process that catches it (bit 10 of SigCgt in /proc/PID/status): the trainer's
  `faulthandler.register(signal.SIGUSR1, all_threads=True)` writes all threads' stacks to its stderr, which is
  the rank's log. SIGUSR1's default action kills the process, so it is never sent blind.
- Neither: a line in the rank's log says so, so the log still explains what happened at the hang.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

PY_SPY_TIMEOUT_SECONDS = 20.0


def py_spy_path() -> str | None:
    """py-spy on PATH, or installed next to this interpreter (a virtualenv's bin, not on PATH)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def catches_signal(pid: int, signum: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def _append(log: Path, text: str) -> None:
    with open(log, "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def dump_stacks(
    rank_pids: Mapping[int, int], log_dir: Path, *, texts: dict[int, str] | None = None
) -> dict[int, str]:
    """Each rank's stacks into `log_dir/rank-<r>.log`; returns how, per rank: py-spy, sigusr1 or unavailable.
    `texts`, when given, also receives py-spy's dump per rank (for the hang's culprits, controller/hangs.py)."""
    py_spy = py_spy_path()
    done: dict[int, str] = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for rank, pid in rank_pids.items():
        log = log_dir / f"rank-{rank}.log"
        if py_spy:
            try:
                result = subprocess.run(
                    [py_spy, "dump", "--pid", str(pid)],
                    capture_output=True,
                    text=True,
                    timeout=PY_SPY_TIMEOUT_SECONDS,
                    check=False,
                )
                if result.returncode == 0:
                    _append(log, f"==== vlctl: stacks of rank {rank} (pid {pid}) by py-spy at {stamp} ====")
                    _append(log, result.stdout)
                    done[rank] = "py-spy"
                    if texts is not None:
                        texts[rank] = result.stdout
                    continue
            except subprocess.TimeoutExpired:
                pass
        if catches_signal(pid, signal.SIGUSR1):
            _append(log, f"==== vlctl: SIGUSR1 to rank {rank} (pid {pid}) for its stacks at {stamp} ====")
            try:
                os.kill(pid, signal.SIGUSR1)
                done[rank] = "sigusr1"
                continue
            except OSError:
                pass
        _append(log, f"==== vlctl: no stacks for rank {rank} (pid {pid}): no py-spy, no SIGUSR1 handler ====")
        done[rank] = "unavailable"
    return done
