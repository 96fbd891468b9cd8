"""The JSONL tail: every rank's `metrics-rank{N}.jsonl` in the run folder (local backend), every step.

Decisions:

- A line carries the launcher's attempt (absent: 0); lines of any other attempt are skipped (late lines of
  processes already gone) and counted. `start_attempt` keeps the byte offsets.
- A stage or save line may come before or after the line of the step it marks (the package's "Checkpoint
  steps"): the cursor remembers the newest one's step, and a step line already emitted in the poll is marked.
- Scale: per rank a cursor (offset, inode, at most one partial line; a line longer than `max_line_bytes` is
  dropped) and a row of the source's `RankColumns`. A poll is one stat per rank plus reads of the new bytes, at
  most `max_poll_bytes` per file (a poll after a long gap catches up over several). A step line's values go
  into flat buffers (`_Lines`), which become the poll's StepBatch and, each rank's last line, its row of the
  columns, in a few numpy operations per poll: no object per line outlives the line.
"""

from __future__ import annotations

import logging
import math
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from controller.stragglers import StepBatch
from trainer.contract.telemetry import CHECKPOINT_OPERATIONS, JSONL_FILE, PHASES

from .columns import CHECKPOINT_INDEX, OWN_WORK_COLUMNS, RankColumns
from .state import ATTEMPT_KEY, SAVING_OPERATIONS, CheckpointOp, TelemetryUpdate

log = logging.getLogger("controller.ingest")  # the package's logger, whichever source warns

_CHECKPOINT_PREFIX = "checkpoint_seconds/"
_PHASE_PREFIX = "phase_seconds/"
_STORAGE_OUTAGE = "checkpoint_storage_outage_seconds"  # trainer.contract.telemetry METRICS
_CHECKPOINT_KEYS = tuple((op, _CHECKPOINT_PREFIX + op) for op in CHECKPOINT_OPERATIONS)
_PHASE_KEYS = tuple((phase, _PHASE_PREFIX + phase) for phase in PHASES)


def _number(value: Any, what: str) -> float | None:
    """A JSON number (null: None); anything else is a bad line."""
    if type(value) is float:  # nearly every value: the checks below cost 16,384 lines x a dozen values a poll
        return value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    return float(value)


@dataclass(slots=True)
class _Cursor:
    """Where one rank's file has been read to."""

    offset: int = 0
    inode: int | None = None
    partial: bytes = b""  # an unterminated last line, completed by a later read
    skipping: bool = False  # inside a line over max_line_bytes: drop up to the next newline
    checkpoint_step: int | None = None  # step of the newest stage or save line


class JsonlTelemetry:
    """Tails every rank's JSONL file; a sample of the poll's StepBatch per step line of the attempt."""

    def __init__(
        self,
        run_dir: str | Path,
        num_ranks: int,
        attempt: int,
        *,
        nodes: Sequence[str] | None = None,
        start_at_end: bool = False,
        max_poll_bytes: int = 4 << 20,
        max_line_bytes: int = 64 << 10,  # a step line is about 1 KiB
        seed_bytes: int = 64 << 10,
    ):
        """nodes: node name per rank (the JSONL lines do not carry it; the backend knows the placement).
        start_at_end: a controller re-attaching after a restart skips what the files already hold; the rank
        states are seeded from the last `seed_bytes` of each file, without emitting steps."""
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        if attempt < 0:
            raise ValueError(f"attempt: must be >= 0, got {attempt}")
        if nodes is not None and len(nodes) != num_ranks:
            raise ValueError(f"nodes: expected {num_ranks} names (one per rank), got {len(nodes)}")
        if max_line_bytes < 1 or max_poll_bytes < max_line_bytes:
            raise ValueError("max_poll_bytes, max_line_bytes: need 1 <= max_line_bytes <= max_poll_bytes")
        self.run_dir = Path(run_dir)
        self.num_ranks = num_ranks
        self.attempt = attempt
        self.nodes = tuple(nodes) if nodes is not None else None
        self.max_poll_bytes = max_poll_bytes
        self.max_line_bytes = max_line_bytes
        self.bad_lines = 0  # not JSON, or not a metrics object (a corrupted file)
        self.skipped_lines = 0  # of another attempt
        # Strings, not Paths: a Path object per rank is several times its string (issue 14: <= 2 KB a rank).
        self._paths = [os.path.join(self.run_dir, JSONL_FILE.format(rank=r)) for r in range(num_ranks)]
        self._cursors = [_Cursor() for _ in range(num_ranks)]
        self._columns = RankColumns(num_ranks, attempt, self.nodes)
        self._warned: set[int] = set()  # ranks whose file had a bad line: warn once each
        if start_at_end:
            for rank in range(num_ranks):
                self._seed(rank, seed_bytes)

    def reassign(self, nodes: Sequence[str]) -> None:
        """The ranks' nodes changed within the attempt (in-place recovery gave a lost node's ranks to a spare):
        the next reports name the new ones."""
        if len(nodes) != self.num_ranks:
            raise ValueError(f"nodes: expected {self.num_ranks} names (one per rank), got {len(nodes)}")
        self.nodes = tuple(nodes)
        self._columns.reassign(nodes)

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        if attempt < 0:
            raise ValueError(f"attempt: must be >= 0, got {attempt}")
        self.attempt = attempt
        self._columns.clear(attempt)
        for cursor in self._cursors:
            cursor.checkpoint_step = None

    def poll(self, now: float) -> TelemetryUpdate:
        lines = _Lines()
        ops: list[CheckpointOp] = []
        for rank in range(self.num_ranks):
            data = self._read_new(rank)
            if data:
                self._apply(rank, data, now, lines, ops)
        batch = lines.commit(self._columns, now)
        return TelemetryUpdate(
            attempt=self.attempt, steps=batch, ranks=self._columns.view(), checkpoint_ops=ops
        )

    def close(self) -> None:
        pass

    def _read_new(self, rank: int) -> bytes:
        """The complete lines appended since the last read (at most max_poll_bytes of the file)."""
        cursor = self._cursors[rank]
        try:
            st = os.stat(self._paths[rank])
        except FileNotFoundError:
            return b""  # the rank has not started yet
        if st.st_ino != cursor.inode or st.st_size < cursor.offset:  # a new or truncated file
            cursor.inode, cursor.offset, cursor.partial, cursor.skipping = st.st_ino, 0, b"", False
        if st.st_size == cursor.offset:
            return b""
        # os-level calls: a Python file object per read was a large part of a poll at 16,384 ranks.
        try:
            fd = os.open(self._paths[rank], os.O_RDONLY)
        except FileNotFoundError:
            return b""  # replaced between the stat and the open: read at the next poll
        try:
            chunk = os.pread(fd, min(st.st_size - cursor.offset, self.max_poll_bytes), cursor.offset)
        finally:
            os.close(fd)
        cursor.offset += len(chunk)
        data = cursor.partial + chunk
        if cursor.skipping:
            cut = data.find(b"\n")
            if cut < 0:
                cursor.partial = b""
                return b""
            data, cursor.skipping = data[cut + 1 :], False
        end = data.rfind(b"\n") + 1
        cursor.partial = data[end:]
        if len(cursor.partial) > self.max_line_bytes:
            self._bad_line(rank, f"a line longer than {self.max_line_bytes} bytes")
            cursor.partial, cursor.skipping = b"", True
        return data[:end]

    def _seed(self, rank: int, seed_bytes: int) -> None:
        cursor = self._cursors[rank]
        try:
            with open(self._paths[rank], "rb") as f:
                st = os.fstat(f.fileno())
                start = max(0, st.st_size - seed_bytes)
                f.seek(start)
                data = f.read(st.st_size - start)
        except FileNotFoundError:
            return
        cursor.inode = st.st_ino
        if start > 0:  # the first line is cut
            if b"\n" not in data:  # inside a line longer than seed_bytes
                cursor.offset, cursor.skipping = st.st_size, True
                return
            data = data[data.find(b"\n") + 1 :]
        end = data.rfind(b"\n") + 1
        cursor.offset = st.st_size - (len(data) - end)  # a partial last line is read again, whole
        lines = _Lines()
        self._apply(rank, data[:end], None, lines, None)
        lines.commit(self._columns, None)

    def _apply(
        self, rank: int, data: bytes, now: float | None, lines: _Lines, ops: list[CheckpointOp] | None
    ) -> None:
        """Folds complete lines of one rank: step lines into `lines` (the rank's columns take the last at
        `commit`), the rest into the columns now; with `ops`, also emits the checkpoint operations."""
        cursor = self._cursors[rank]
        columns = self._columns
        emitted: int | None = None  # index in `lines` of this rank's last step line of the poll
        for raw in data.splitlines():
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
                if type(record) is not dict:
                    raise ValueError("not a JSON object")
                if record.get(ATTEMPT_KEY, 0) != self.attempt:
                    self.skipped_lines += 1
                    continue
                line = _parse_line(record)
            except ValueError as e:  # orjson.JSONDecodeError is a ValueError
                self._bad_line(rank, str(e))
                continue
            step, checkpoints, outage, wait_at, values = line
            columns.reported[rank] = True
            saving = False
            for operation, seconds in checkpoints:
                columns.checkpoint_seconds[rank, CHECKPOINT_INDEX[operation]] = seconds
                saving = saving or operation in SAVING_OPERATIONS
                if ops is not None:
                    ops.append(CheckpointOp(rank=rank, step=step, operation=operation, seconds=seconds))
            if outage is not None:
                # Each line in an outage is a sign of life (the trainer writes them while it waits for storage).
                columns.storage_outage_seconds[rank] = outage
                columns.storage_wait_at[rank] = wait_at
            if saving:
                cursor.checkpoint_step = step
            if values is not None:
                emitted = lines.add(rank, step, values, checkpoint_step=cursor.checkpoint_step == step)
            elif (checkpoints or outage is not None) and now is not None:
                columns.updated_at[rank] = now
            if saving and emitted is not None and lines.step[emitted] == step:
                lines.checkpoint[emitted] = True  # the stage or save line came after its step's line

    def _bad_line(self, rank: int, why: str) -> None:
        self.bad_lines += 1
        if rank not in self._warned:
            self._warned.add(rank)
            log.warning("%s: skipped a line: %s (further ones are counted only)", self._paths[rank], why)


_StepValues = tuple[float, float, float, float, float, float, list[float]]  # see _parse_line


def _parse_line(
    record: Mapping[str, Any],
) -> tuple[int, list[tuple[str, float]], float | None, float, _StepValues | None]:
    """A JSONL line of the source's attempt -> (step, its checkpoint operations, the storage outage it reports
    and the time of that sign of life, and for a step line its values: wall, own work, progress time, loss,
    text and vision tokens, phases in PHASES order, NaN where absent). Raises ValueError before anything is
    written: a bad line changes nothing."""
    nan = math.nan
    step = record.get("step")
    if type(step) is not int or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    checkpoints = []
    for operation, key in _CHECKPOINT_KEYS:  # a lookup per operation, not a scan of the line's keys
        if key in record and (seconds := _number(record[key], key)) is not None:
            checkpoints.append((operation, seconds))
    outage = _number(record.get(_STORAGE_OUTAGE), _STORAGE_OUTAGE)
    wait_at = nan
    if outage is not None and outage > 0:
        when = _number(record.get("time"), "time")
        wait_at = when if when is not None else nan
    if "step_seconds" not in record:  # a checkpoint line
        return step, checkpoints, outage, wait_at, None
    wall = _number(record["step_seconds"], "step_seconds")
    own = _number(record.get("own_work_seconds"), "own_work_seconds")
    phases = []
    for _, key in _PHASE_KEYS:
        seconds = _number(record.get(key), key)
        phases.append(nan if seconds is None else seconds)
    progress = _number(record.get("last_progress_timestamp_seconds"), "last_progress_timestamp_seconds")
    if progress is None:
        progress = _number(record.get("time"), "time")
    loss = _number(record.get("loss"), "loss")
    values = (
        nan if wall is None else wall,
        nan if own is None else own,
        nan if progress is None else progress,
        nan if loss is None or not math.isfinite(loss) else loss,  # a non-finite loss is not one to average
        _number(record.get("text_tokens"), "text_tokens") or 0.0,
        _number(record.get("vision_tokens"), "vision_tokens") or 0.0,
        phases,
    )
    return step, checkpoints, outage, wait_at, values


class _Lines:
    """A poll's step lines in flat buffers, in reading order (ranks in turn, each rank's lines in order)."""

    __slots__ = ("rank", "step", "wall", "own", "progress", "loss", "text", "vision", "phases", "checkpoint")

    def __init__(self) -> None:
        self.rank = array("q")
        self.step = array("q")
        self.wall, self.own, self.progress, self.loss = array("d"), array("d"), array("d"), array("d")
        self.text, self.vision = array("d"), array("d")
        self.phases = array("d")  # len(PHASES) a line
        self.checkpoint = bytearray()

    def add(self, rank: int, step: int, values: _StepValues, *, checkpoint_step: bool) -> int:
        wall, own, progress, loss, text, vision, phases = values
        self.rank.append(rank)
        self.step.append(step)
        self.wall.append(wall)
        self.own.append(own)
        self.progress.append(progress)
        self.loss.append(loss)
        self.text.append(text)
        self.vision.append(vision)
        self.phases.extend(phases)
        self.checkpoint.append(checkpoint_step)
        return len(self.rank) - 1

    def commit(self, columns: RankColumns, now: float | None) -> StepBatch:
        """Writes each rank's last step line into `columns` (token totals: every line) and returns the lines
        as the poll's StepBatch."""
        rank = np.frombuffer(self.rank, dtype=np.int64)
        n = rank.size
        phases = np.frombuffer(self.phases, dtype=np.float64).reshape(n, len(PHASES))
        wall = np.frombuffer(self.wall, dtype=np.float64)
        own = np.frombuffer(self.own, dtype=np.float64)
        step = np.frombuffer(self.step, dtype=np.int64)
        if n:
            # The lines come rank by rank: a rank's last line is where the next line's rank differs.
            last = np.flatnonzero(np.append(rank[1:] != rank[:-1], True))
            at = rank[last]
            text = np.frombuffer(self.text, dtype=np.float64)
            vision = np.frombuffer(self.vision, dtype=np.float64)
            columns.step[at] = step[last]
            columns.last_progress[at] = np.frombuffer(self.progress, dtype=np.float64)[last]
            columns.step_seconds[at] = wall[last]
            columns.own_work_seconds[at] = own[last]
            columns.loss[at] = np.frombuffer(self.loss, dtype=np.float64)[last]
            columns.phase_seconds[at] = phases[last]
            tokens = text[last] + vision[last]
            with np.errstate(divide="ignore", invalid="ignore"):
                rate = tokens / wall[last]
            columns.tokens_per_second[at] = np.where((wall[last] != 0) & ~np.isnan(wall[last]), rate, np.nan)
            # Every line's tokens: sums per rank, its lines in order (np.add.reduceat over each rank's run).
            starts = np.append(0, last[:-1] + 1)
            columns.text_tokens_total[at] += np.add.reduceat(text, starts)
            columns.vision_tokens_total[at] += np.add.reduceat(vision, starts)
            if now is not None:
                columns.updated_at[at] = now
        return StepBatch(
            rank=rank,
            node=columns.node[rank],
            step=step,
            own_work_seconds=own,
            phase_seconds=phases[:, OWN_WORK_COLUMNS],
            is_checkpoint_step=np.frombuffer(self.checkpoint, dtype=bool),
            after_restart=np.zeros(n, dtype=bool),
            attempt=np.full(n, columns.attempt),
            wall_seconds=wall,
        )
