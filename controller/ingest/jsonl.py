"""The JSONL tail: every rank's `metrics-rank{N}.jsonl` in the run folder (local backend), every step.

Decisions:

- A line carries the launcher's attempt (absent: 0); lines of any other attempt are skipped (late lines of
  processes already gone) and counted. `start_attempt` keeps the byte offsets.
- A stage or save line may come before or after the line of the step it marks (the package's "Checkpoint
  steps"): the cursor remembers the newest one's step, and a step line already emitted in the poll is marked.
- Scale: per rank a cursor (offset, inode, at most one partial line; a line longer than `max_line_bytes` is
  dropped) and one `RankState`. A poll is one stat per rank plus reads of the new bytes, at most
  `max_poll_bytes` per file (a poll after a long gap catches up over several); its step list is O(new lines).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from controller.stragglers import StepSample
from trainer.contract.telemetry import CHECKPOINT_OPERATIONS, JSONL_FILE, PHASES

from .state import (
    ATTEMPT_KEY,
    SAVING_OPERATIONS,
    CheckpointOp,
    RankState,
    TelemetryUpdate,
    finite_or_none,
    own_work_phases,
)

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
    """Tails every rank's JSONL file; one StepSample per step line of the attempt."""

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
        self._states: dict[int, RankState] = {}
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
        self._states = {r: replace(s, node=nodes[r]) for r, s in self._states.items()}

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        if attempt < 0:
            raise ValueError(f"attempt: must be >= 0, got {attempt}")
        self.attempt = attempt
        self._states.clear()
        for cursor in self._cursors:
            cursor.checkpoint_step = None

    def poll(self, now: float) -> TelemetryUpdate:
        steps: list[StepSample] = []
        ops: list[CheckpointOp] = []
        for rank in range(self.num_ranks):
            data = self._read_new(rank)
            if data:
                self._apply(rank, data, now, steps, ops)
        return TelemetryUpdate(
            attempt=self.attempt, steps=steps, ranks=dict(self._states), checkpoint_ops=ops
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
        self._apply(rank, data[:end], None, None, None)

    def _apply(
        self,
        rank: int,
        data: bytes,
        now: float | None,
        steps: list[StepSample] | None,
        ops: list[CheckpointOp] | None,
    ) -> None:
        """Folds complete lines into the rank's state; with `steps`/`ops`, also emits what they hold."""
        cursor = self._cursors[rank]
        state = self._states.get(rank)
        emitted: int | None = None  # index in `steps` of this rank's last sample of the poll
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                attempt = record.get(ATTEMPT_KEY, 0)
                if attempt != self.attempt:
                    self.skipped_lines += 1
                    continue
                step = record.get("step")
                if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                    raise ValueError(f"step: expected an integer >= 0, got {step!r}")
                if state is None:
                    node = self.nodes[rank] if self.nodes is not None else ""
                    state = RankState(rank=rank, attempt=self.attempt, node=node)
                state, sample, line_ops = _fold_line(state, record, step, now)
            except ValueError as e:  # orjson.JSONDecodeError is a ValueError
                self._bad_line(rank, str(e))
                continue
            saving = [op for op in line_ops if op.operation in SAVING_OPERATIONS]
            if saving:
                cursor.checkpoint_step = step
            if steps is None or ops is None:
                continue
            ops.extend(line_ops)
            if sample is not None:
                if cursor.checkpoint_step == step:
                    sample = replace(sample, is_checkpoint_step=True)
                emitted = len(steps)
                steps.append(sample)
            elif saving and emitted is not None and steps[emitted].step == step:
                steps[emitted] = replace(steps[emitted], is_checkpoint_step=True)  # the line came after
        if state is not None:
            self._states[rank] = state

    def _bad_line(self, rank: int, why: str) -> None:
        self.bad_lines += 1
        if rank not in self._warned:
            self._warned.add(rank)
            log.warning("%s: skipped a line: %s (further ones are counted only)", self._paths[rank], why)


def _fold_line(
    state: RankState, record: Mapping[str, Any], step: int, now: float | None
) -> tuple[RankState, StepSample | None, list[CheckpointOp]]:
    """One JSONL line of the state's attempt -> the new state, its step sample and its checkpoint operations."""
    changes: dict[str, Any] = {}
    ops = []
    checkpoint = dict(state.checkpoint_seconds)
    for operation, key in _CHECKPOINT_KEYS:  # a lookup per operation, not a scan of the line's keys
        if key in record and (seconds := _number(record[key], key)) is not None:
            checkpoint[operation] = seconds
            ops.append(CheckpointOp(rank=state.rank, step=step, operation=operation, seconds=seconds))
    if ops:
        changes["checkpoint_seconds"] = checkpoint
    outage = _number(record.get(_STORAGE_OUTAGE), _STORAGE_OUTAGE)
    if outage is not None:
        # Each line in an outage is a sign of life (the trainer writes them while it waits for the storage).
        changes["storage_outage_seconds"] = outage
        changes["storage_wait_at"] = _number(record.get("time"), "time") if outage > 0 else None
    if "step_seconds" not in record:  # a checkpoint line
        if changes and now is not None:
            changes["updated_at"] = now
        return (replace(state, **changes) if changes else state), None, ops
    # A step line, the one a rank writes every step: the new state is built whole, not through `replace`
    # (which reads every field back first: a line a rank a second adds up at 16,384 ranks).
    wall = _number(record["step_seconds"], "step_seconds")
    own = _number(record.get("own_work_seconds"), "own_work_seconds")
    phases = {}
    for phase, key in _PHASE_KEYS:
        seconds = _number(record.get(key), key)
        if seconds is not None:
            phases[phase] = seconds
    text = _number(record.get("text_tokens"), "text_tokens") or 0.0
    vision = _number(record.get("vision_tokens"), "vision_tokens") or 0.0
    progress = _number(record.get("last_progress_timestamp_seconds"), "last_progress_timestamp_seconds")
    new = RankState(
        rank=state.rank,
        attempt=state.attempt,
        node=state.node,
        pid=state.pid,
        step=step,
        last_progress=progress if progress is not None else _number(record.get("time"), "time"),
        process_start=state.process_start,
        step_seconds=wall,
        own_work_seconds=own,
        phase_seconds=phases,
        loss=finite_or_none(_number(record.get("loss"), "loss")),
        text_tokens_total=state.text_tokens_total + text,
        vision_tokens_total=state.vision_tokens_total + vision,
        tokens_per_second=(text + vision) / wall if wall else None,
        checkpoint_seconds=changes.get("checkpoint_seconds", state.checkpoint_seconds),
        storage_outage_seconds=changes.get("storage_outage_seconds", state.storage_outage_seconds),
        storage_wait_at=changes.get("storage_wait_at", state.storage_wait_at),
        updated_at=now if now is not None else state.updated_at,
        failures=state.failures,
    )
    sample = StepSample(
        rank=state.rank,
        node=state.node,
        step=step,
        own_work_seconds=own,
        phase_seconds=own_work_phases(phases),
        wall_seconds=wall,
        attempt=state.attempt,
    )
    return new, sample, ops
