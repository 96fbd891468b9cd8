"""`vlctl logs` for jobs of the store: what the local backend's ranks and node agents wrote in the run folder.

Logs are read from the files the local backend writes (`<run_dir>/logs/attempt-<k>/rank-<r>.log`, and each node
agent's `node-<name>.log`); `--follow` polls them, and the job's phase, until the job ends, so a person can watch
a run from any shell on the machine without the controller's help.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from controller.backends.local import log_dir
from controller.domain.phases import TERMINAL_PHASES, Phase
from controller.store.models import Job
from controller.store.session import Store

from .client import LogRequest
from .errors import EXIT_USER_ERROR, CliError
from .output import OutputFormat, emit, stderr
from .store import load_job, store

FOLLOW_POLL_SECONDS = 1.0  # how often `logs --follow` looks for new lines and re-reads the job's phase
_TAIL_BLOCK = 64 * 1024
_RANK_LOG = re.compile(r"rank-(\d+)\.log")
_NODE_LOG = re.compile(r"node-(.+)\.log")
_NODE_NAME = re.compile(r"[A-Za-z0-9][-A-Za-z0-9.]*")  # a node name is one path component, never ".."


@dataclass(kw_only=True)
class LogFile:
    """One log being read: a rank's (`rank` set) or a node agent's (`node` set)."""

    path: Path
    rank: int | None = None
    node: str | None = None
    offset: int = 0  # bytes already printed
    partial: bytes = field(default=b"", repr=False)  # a last line still being written

    @property
    def prefix(self) -> str:
        return f"[rank {self.rank}] " if self.rank is not None else f"[node {self.node}] "

    def tail(self, num_lines: int, *, complete_only: bool) -> list[str]:
        """The last `num_lines` lines, reading backwards in blocks (a rank's log can be gigabytes), and move
        `offset` past them. `complete_only`: leave a last line without its newline for `read_new`."""
        with open(self.path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            data, pos = b"", end
            while pos > 0 and data.count(b"\n") <= num_lines:
                step = min(_TAIL_BLOCK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
        self.offset = end
        if complete_only:
            cut = data.rfind(b"\n") + 1
            self.offset -= len(data) - cut
            data = data[:cut]
        lines = data.decode("utf-8", errors="replace").splitlines()
        return lines[-num_lines:] if num_lines else []

    def read_new(self, *, final: bool = False) -> list[str]:
        """Complete lines appended since the last read; `final` also returns an unfinished last line."""
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:  # truncated or replaced: start over
                    self.offset, self.partial = 0, b""
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        self.offset += len(data)
        data = self.partial + data
        cut = len(data) if final else data.rfind(b"\n") + 1
        self.partial = data[cut:]
        return data[:cut].decode("utf-8", errors="replace").splitlines()


def _find_logs(folder: Path, *, rank: int | None, node: str | None) -> list[LogFile]:
    """The logs to show, ranks in numeric order: the one asked for, or every rank's (the node agents' when no
    rank has written yet, e.g. a launch that failed before the ranks started)."""
    if rank is not None:
        path = folder / f"rank-{rank}.log"
        return [LogFile(path=path, rank=rank)] if path.is_file() else []
    if node is not None:
        path = folder / f"node-{node}.log"
        return [LogFile(path=path, node=node)] if path.is_file() else []
    names = os.listdir(folder) if folder.is_dir() else []
    ranks = sorted(int(m[1]) for n in names if (m := _RANK_LOG.fullmatch(n)))
    if ranks:
        return [LogFile(path=folder / f"rank-{r}.log", rank=r) for r in ranks]
    return [LogFile(path=folder / n, node=m[1]) for n in sorted(names) if (m := _NODE_LOG.fullmatch(n))]


def _write(lines: list[str], prefix: str) -> None:
    if lines:
        sys.stdout.write("".join(f"{prefix}{line}\n" for line in lines))
        sys.stdout.flush()


def _job_now(db: Store, job_id: int) -> tuple[Phase, int]:
    with db.read() as session:
        row = session.execute(select(Job.phase, Job.current_attempt).where(Job.id == job_id)).one_or_none()
    if row is None:
        raise CliError("logs: the job was deleted while following it", EXIT_USER_ERROR)
    return row[0], row[1]


def _order(f: LogFile) -> tuple[int, int, str]:
    return (0, f.rank, "") if f.rank is not None else (1, 0, f.node or "")


def _follow(
    db: Store,
    job_id: int,
    run_dir: str,
    attempt: int,
    files: list[LogFile],
    *,
    pinned: bool,
    rank: int | None,
    node: str | None,
) -> None:
    """Print new lines until the job reaches a terminal phase. Unless an attempt was pinned (`--attempt`), a
    restart switches to the new attempt's folder. The phase is read before the files, so every line written
    before the job ended is printed."""
    prefixed = rank is None and node is None
    following = {f.path: f for f in files}
    while True:
        phase, current = _job_now(db, job_id)
        done = phase in TERMINAL_PHASES
        switch = not pinned and current != attempt
        for f in _find_logs(log_dir(run_dir, attempt), rank=rank, node=node):
            following.setdefault(f.path, f)  # a rank that started since: from its first line
        for f in sorted(following.values(), key=_order):
            _write(f.read_new(final=done or switch), f.prefix if prefixed else "")
        if switch:
            attempt, following = current, {}
            stderr.print(f"--- attempt {attempt} ---", markup=False, highlight=False)
            continue  # at once, from their first lines, even if the job has ended since: the next pass returns
        if done:
            return
        time.sleep(FOLLOW_POLL_SECONDS)


def logs(job: str, request: LogRequest) -> None:
    """The last lines of the job's logs from the local backend's files (`vlctl logs`, cli/jobs.py)."""
    rank, node, attempt, follow, lines, output = (
        request.rank, request.node, request.attempt, request.follow, request.lines, request.output
    )  # fmt: skip
    if follow and output is OutputFormat.json:
        raise CliError("--follow: not with --output json, which prints a single document", EXIT_USER_ERROR)
    if rank is not None and node is not None:
        raise CliError("--rank, --node: give one or the other", EXIT_USER_ERROR)
    if node is not None and not _NODE_NAME.fullmatch(node):
        raise CliError(f"--node: {node!r} is not a node name", EXIT_USER_ERROR)
    with store() as db:
        with db.read() as session:
            found = load_job(session, job)
            job_id, run_dir, current = found.id, found.run_dir, found.current_attempt
        if run_dir is None or current == 0:
            raise CliError(
                f"logs: job {job!r} has never been launched, so it has no logs yet", EXIT_USER_ERROR
            )
        number = current if attempt is None else attempt
        if number > current:
            raise CliError(f"--attempt: job {job!r} has attempts 1 to {current}", EXIT_USER_ERROR)
        folder = log_dir(run_dir, number)
        files = _find_logs(folder, rank=rank, node=node)
        if not files and not follow:
            what = f"rank {rank}" if rank is not None else f"node {node}" if node is not None else "any rank"
            raise CliError(f"logs: no log of {what} for attempt {number} in {folder}", EXIT_USER_ERROR)
        if rank is None and node is None and files and files[0].node is not None:
            stderr.print("no rank has written a log yet; showing the node agents' logs", highlight=False)
        if output is OutputFormat.json:
            data = [
                {
                    "attempt": number,
                    "rank": f.rank,
                    "node": f.node,
                    "path": str(f.path),
                    "lines": f.tail(lines, complete_only=False),
                }
                for f in files
            ]
            emit(data, output, str)
            return
        prefixed = rank is None and node is None
        for f in files:
            _write(f.tail(lines, complete_only=follow), f.prefix if prefixed else "")
        if follow:
            _follow(db, job_id, run_dir, number, files, pinned=attempt is not None, rank=rank, node=node)
