"""Per-rank exit codes of a node, read from its torchrun agent's failure summary.

A torchrun agent exits 1 whenever one of its workers fails, whatever the worker's own status was, so the node's
exit code cannot tell a SIGKILL from an injected crash or a configuration error. When a worker fails, the agent
prints a summary (`ChildFailedError`) with one block per failed worker: its global rank and its exit code
(negative: killed by that signal), the root cause first. That summary is the only place the statuses survive
after the workers are gone; this module reads it back. A node without a summary (it succeeded, or its agent was
killed before printing) yields no rank exits.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)", re.MULTILINE)
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", re.MULTILINE)
_TIME = re.compile(r"^\s*time\s*:\s*(\S+)", re.MULTILINE)
_ROOT_CAUSE = "Root Cause (first observed failure):"
_TAIL_BYTES = 64 << 10  # the summary is printed last; a long log is read from its end


@dataclass(frozen=True, slots=True)
class WorkerExit:
    rank: int
    local_rank: int
    returncode: int  # Popen style: -N killed by signal N
    pid: int
    root_cause: bool  # the agent saw this worker fail first
    time: float | None = None  # unix seconds the agent recorded (1 s resolution, the agent's local time)


def parse_failures(text: str) -> list[WorkerExit]:
    """Every failed worker in the last summary of `text`, root cause first."""
    start = text.rfind("ChildFailedError")
    if start < 0:
        return []
    summary = text[start:]
    root_at = summary.find(_ROOT_CAUSE)
    exits: dict[int, WorkerExit] = {}
    for block in re.split(r"^\s*\[\d+\]:\s*$", summary, flags=re.MULTILINE)[1:]:
        rank, code = _RANK.search(block), _EXIT.search(block)
        if rank is None or code is None:
            continue
        offset = summary.find(block)
        when = _TIME.search(block)
        exit_ = WorkerExit(
            rank=int(rank.group(1)),
            local_rank=int(rank.group(2)),
            returncode=int(code.group(1)),
            pid=int(code.group(2)),
            root_cause=root_at >= 0 and offset > root_at,
            time=_parse_time(when.group(1)) if when else None,
        )
        if exit_.rank not in exits or exit_.root_cause:
            exits[exit_.rank] = exit_
    return sorted(exits.values(), key=lambda e: (not e.root_cause, e.rank))


def _parse_time(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%d_%H:%M:%S"))
    except ValueError:
        return None


def read_failures(agent_log: Path) -> list[WorkerExit]:
    try:
        with open(agent_log, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return parse_failures(text)
