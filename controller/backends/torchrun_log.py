"""Per-rank exit codes of a node, read from its torchrun agent's failure summary.

A torchrun agent exits 1 whenever one of its workers fails, whatever the worker's own status was, so the node's
exit code cannot tell a SIGKILL from an injected crash or a configuration error. When a worker fails, the agent
prints a summary (`ChildFailedError`) with one block per failed worker: its global rank and its exit code
(negative: killed by that signal), the root cause first. That summary is the only place the statuses survive
after the workers are gone; this module reads it back. A node without a summary (it succeeded, or its agent was
killed before printing) yields no rank exits from its log; `node_exits` then speaks for its ranks with the node's
own status, marked as the agent's.

Which failure came first is decided across nodes by when each node ended (`root_causes`): every agent names its
own first failed worker, but a rank that lost its peer fails too, and only the node that ended first holds the
gang's root cause. Node end times are precise (an exit record's mtime, a pod's finishedAt); the agents' own
times have a resolution of one second and order two nodes only when they are further apart than that (a node
whose agent spent seconds stopping its healthy local ranks ends after the peer it brought down).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
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
    agent: bool = False  # the node's agent ended (killed) without a report of the worker: its status
    node: str = ""  # the node (local name or Kubernetes slot) whose agent reported it, when the backend knows


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


def node_exits(
    summary: Sequence[WorkerExit],
    *,
    node: str,
    code: int,
    first_rank: int,
    procs_per_node: int,
    finished: float | None,
) -> list[WorkerExit]:
    """The failed ranks of a node that ended with `code` (a shell's status: 128 + N for signal N): its agent's
    summary, or when there is none (the agent itself was killed) one exit per rank of the node with the node's
    status, marked `agent`."""
    if summary:  # the rank from the node's place: an independent node's torchrun numbers its ranks from 0
        return [replace(e, node=node, rank=first_rank + e.local_rank) for e in summary]
    returncode = -(code - 128) if 128 < code <= 128 + 64 else code
    return [
        WorkerExit(
            rank=first_rank + local,
            local_rank=local,
            returncode=returncode,
            pid=0,
            root_cause=local == 0,
            time=finished,
            agent=True,
            node=node,
        )
        for local in range(procs_per_node)
    ]


def root_causes(per_node: Iterable[tuple[float, Sequence[WorkerExit]]]) -> list[WorkerExit]:
    """Every node's failed ranks, with root_cause kept only in the node whose failure came first (its agent's root
    cause, or its first rank when it had none); root causes first, then by rank.

    The node that ended first is taken, except where another node's agent saw its first worker fail clearly (more
    than the agents' one-second resolution) before the first node's agent did: an agent with several local ranks
    stops the healthy ones (each finishing its step) before it ends, and a peer whose ranks failed only because
    of it can end sooner. Agents' times are compared only with each other (they are the agents' local clocks)."""
    ordered = [list(exits) for _, exits in sorted(per_node, key=lambda item: item[0]) if exits]
    if not ordered:
        return []
    reported = [(_first_seen(exits), i) for i, exits in enumerate(ordered) if _first_seen(exits) is not None]
    if reported and _first_seen(ordered[0]) is not None:
        seen, i = min(reported)
        if seen < _first_seen(ordered[0]) - _AGENT_TIME_RESOLUTION:  # type: ignore[operator]
            ordered.insert(0, ordered.pop(i))
    if not any(e.root_cause for e in ordered[0]):
        ordered[0][0] = replace(ordered[0][0], root_cause=True)
    first = {e.rank for e in ordered[0] if e.root_cause}
    exits = [
        e if e.rank in first or not e.root_cause else replace(e, root_cause=False)
        for node in ordered
        for e in node
    ]
    return sorted(exits, key=lambda e: (not e.root_cause, e.rank))


_AGENT_TIME_RESOLUTION = 1.0


def _first_seen(exits: Sequence[WorkerExit]) -> float | None:
    """When the node's agent saw its first worker fail, by its own summary (None: no summary times)."""
    times = [e.time for e in exits if e.time is not None and not e.agent]
    return min(times) if times else None
