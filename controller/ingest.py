"""Metrics ingest: how the controller reads the ranks' step telemetry (see trainer.contract.telemetry).

Three sources behind one interface, `TelemetrySource.poll(now) -> TelemetryUpdate`:

- `JsonlTelemetry` tails each rank's `metrics-rank{N}.jsonl` in the run folder (local backend): every step.
- `EndpointTelemetry` scrapes each rank's HTTP endpoint, found through `metrics-rank{N}.endpoint.json`: the newest
  step per scrape.
- `PrometheusTelemetry` reads the same series from a Prometheus server's HTTP API (clusters, where Prometheus
  already scrapes the pods): the newest step per poll.

Decisions:

- Attempts. Every attempt appends to the same files, so JSONL lines and endpoint files carry the launcher's
  attempt number (absent: 0). A source reads one attempt; lines and endpoints of any other are skipped (late
  lines of processes already gone). `start_attempt(k)` switches before attempt k is launched, keeping the byte
  offsets. Prometheus series carry no attempt: a series of a process started before the attempt's launch is
  skipped, and where a rank has several (an old pod not yet stale) the newest process wins.
- Checkpoint steps. The trainer stages a checkpoint between two steps and saves it in the background during the
  next, and logs the stage under that next step's index; so the step whose index equals a stage or save line's
  step is marked `is_checkpoint_step`, whichever line comes first. A scrape sees a checkpoint as a changed
  `checkpoint_seconds` gauge and marks the step it reports. Loads (before the first step) mark nothing.
- A scrape's step sample is the newest step only, emitted when the step advanced and the rank has timed a step
  (`step_seconds` set). The step gauge also moves on a checkpoint line, so a scrape can see the index of a step
  about to start; such a sample is a checkpoint step and the straggler detector skips it.
- Token rates. JSONL: the last step's tokens over its wall time. Scrapes: the counters' increase over the steps
  advanced, per step, over the last step's wall time. Ranks of one data-parallel replica (tp x pp) count the
  same tokens, so `job_progress` divides by `ranks_per_replica`.
- Scale (16,384 ranks). Per rank a source keeps one `RankState` (fixed fields; its phase and checkpoint maps
  hold at most the contract's label values) and, for JSONL, a cursor: offset, inode, and at most one partial
  line (longer than `max_line_bytes` is dropped). Nothing grows with the steps. A JSONL poll is one stat per
  rank plus reads of the new bytes, at most `max_poll_bytes` per file (a poll after a long gap catches up over
  several); its step list is O(new lines). A scrape poll keeps one sample per rank. A Prometheus poll is one
  query for about 20 series per rank (about 330k at 16,384 ranks: tens of MB of JSON, poll it every 15 s or
  slower).
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import statistics
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from controller.hangs import RankProgress
from controller.stragglers import StepBatch, StepSample
from trainer.contract.telemetry import (
    CHECKPOINT_LABEL,
    CHECKPOINT_OPERATIONS,
    ENDPOINT_FILE,
    JSONL_FILE,
    LABEL_LOCAL_RANK,
    LABEL_NODE,
    LABEL_RANK,
    LABEL_TRAINING_JOB,
    METRICS,
    METRICS_BY_NAME,
    OWN_WORK_PHASES,
    PHASE_LABEL,
    PHASES,
    PREFIX,
    RankSample,
    parse_rank_metrics,
)

log = logging.getLogger("controller.ingest")

ATTEMPT_KEY = "attempt"  # in JSONL lines and endpoint files (trainer.contract.telemetry.ENV_ATTEMPT)
SAVING_OPERATIONS = ("stage", "save")  # the operations that make a step a checkpoint step
_CHECKPOINT_PREFIX = "checkpoint_seconds/"
_PHASE_PREFIX = "phase_seconds/"
_STORAGE_OUTAGE = "checkpoint_storage_outage_seconds"  # trainer.contract.telemetry METRICS


# ------------------------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class CheckpointOp:
    rank: int
    step: int
    operation: str  # one of CHECKPOINT_OPERATIONS
    seconds: float


@dataclass(kw_only=True, frozen=True, slots=True)
class RankState:
    """The newest known telemetry of one rank in the source's attempt; None where not reported yet."""

    rank: int
    attempt: int
    node: str = ""
    pid: int | None = None  # scrapes only (JSONL lines do not carry it)
    step: int | None = None  # last completed step (a scrape: the step gauge)
    last_progress: float | None = None  # unix seconds of the last step or micro-step (JSONL: step ends only)
    process_start: float | None = None  # unix seconds; scrapes only
    step_seconds: float | None = None  # wall time of the last step
    own_work_seconds: float | None = None
    phase_seconds: Mapping[str, float] = field(default_factory=dict)  # the last step's, keys from PHASES
    loss: float | None = None  # None also for a non-finite loss
    text_tokens_total: float = 0.0  # JSONL: over the lines read; scrapes: the process's counter
    vision_tokens_total: float = 0.0
    tokens_per_second: float | None = None  # this rank's text + vision tokens per second of the last step(s)
    checkpoint_seconds: Mapping[str, float] = field(default_factory=dict)  # newest per operation
    storage_outage_seconds: float | None = None  # the checkpoint storage outage it reports (0: none)
    storage_wait_at: float | None = None  # unix seconds of its newest sign of life while in an outage
    updated_at: float | None = None  # the controller's clock (poll `now`) when this rank last reported
    failures: int = 0  # consecutive failed scrapes (endpoint source)

    def progress(self) -> RankProgress:
        return RankProgress(
            rank=self.rank,
            node=self.node,
            step=self.step,
            last_progress=self.last_progress,
            process_start=self.process_start,
            storage_wait_at=self.storage_wait_at,
        )


@dataclass(kw_only=True, slots=True)
class TelemetryUpdate:
    attempt: int
    steps: list[StepSample]  # new since the previous poll, in reading order
    ranks: dict[int, RankState]  # every rank that has reported in the attempt (a copy: safe to keep)
    checkpoint_ops: list[CheckpointOp]  # new since the previous poll
    failed: dict[int, str] = field(default_factory=dict)  # rank -> why its scrape failed in this poll
    error: str | None = None  # the source as a whole failed in this poll (Prometheus unreachable)

    def batch(self) -> StepBatch:
        """The new steps in the straggler detector's columns."""
        return StepBatch.from_samples(self.steps)


class TelemetrySource(Protocol):
    attempt: int

    def poll(self, now: float) -> TelemetryUpdate: ...

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        """Read attempt `attempt` from now on (call it before launching it); forgets the ranks' states."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------ helpers


class JobProgress(NamedTuple):
    step: int | None  # the newest step any rank completed (a synchronous job's ranks are within one step)
    loss: float | None  # mean over the ranks at that step with a finite loss
    tokens_per_second: float | None  # the job's text + vision tokens per second


def _states(ranks: TelemetryUpdate | Mapping[int, RankState]) -> Iterable[RankState]:
    return (ranks.ranks if isinstance(ranks, TelemetryUpdate) else ranks).values()


def job_progress(
    ranks: TelemetryUpdate | Mapping[int, RankState], *, ranks_per_replica: int = 1
) -> JobProgress:
    """ranks_per_replica: ranks that process the same tokens (tensor x pipeline parallel size)."""
    if ranks_per_replica < 1:
        raise ValueError(f"ranks_per_replica: must be >= 1, got {ranks_per_replica}")
    states = list(_states(ranks))
    steps = [s.step for s in states if s.step is not None]
    if not steps:
        return JobProgress(None, None, None)
    step = max(steps)
    losses = [s.loss for s in states if s.step == step and s.loss is not None]
    rates = [s.tokens_per_second for s in states if s.tokens_per_second is not None]
    return JobProgress(
        step=step,
        loss=sum(losses) / len(losses) if losses else None,
        tokens_per_second=sum(rates) / ranks_per_replica if rates else None,
    )


def rank_progress(ranks: TelemetryUpdate | Mapping[int, RankState]) -> list[RankProgress]:
    """Hang detection's input, in rank order."""
    return [s.progress() for s in sorted(_states(ranks), key=lambda s: s.rank)]


def median_step_seconds(ranks: TelemetryUpdate | Mapping[int, RankState]) -> float | None:
    times = [s.step_seconds for s in _states(ranks) if s.step_seconds is not None]
    return statistics.median(times) if times else None


def deep_sizeof(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes held by `obj` and everything it references (each object counted once): state checks."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_sizeof(k, seen) + deep_sizeof(v, seen) for k, v in obj.items())
    elif isinstance(obj, list | tuple | set | frozenset):
        size += sum(deep_sizeof(v, seen) for v in obj)
    elif hasattr(obj, "__slots__"):
        slots = [s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ())]
        size += sum(deep_sizeof(getattr(obj, s), seen) for s in slots if hasattr(obj, s))
    return size


def _number(value: Any, what: str) -> float | None:
    """A JSON number (null: None); anything else is a bad line."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what}: expected a number, got {value!r}")
    return float(value)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _own_phases(phases: Mapping[str, float]) -> dict[str, float]:
    return {p: phases[p] for p in OWN_WORK_PHASES if p in phases}


# ------------------------------------------------------------------------------------------------ JSONL


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
        self._paths = [self.run_dir / JSONL_FILE.format(rank=r) for r in range(num_ranks)]
        self._cursors = [_Cursor() for _ in range(num_ranks)]
        self._states: dict[int, RankState] = {}
        self._warned: set[int] = set()  # ranks whose file had a bad line: warn once each
        if start_at_end:
            for rank in range(num_ranks):
                self._seed(rank, seed_bytes)

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

    @property
    def state_nbytes(self) -> int:
        return deep_sizeof(self._cursors) + deep_sizeof(self._states)

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
        with open(self._paths[rank], "rb") as f:
            f.seek(cursor.offset)
            chunk = f.read(min(st.st_size - cursor.offset, self.max_poll_bytes))
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
                record = json.loads(line)
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
            except ValueError as e:  # json.JSONDecodeError is a ValueError
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
    for key, value in record.items():
        if key.startswith(_CHECKPOINT_PREFIX):
            operation = key.removeprefix(_CHECKPOINT_PREFIX)
            seconds = _number(value, key)
            if operation in CHECKPOINT_OPERATIONS and seconds is not None:
                checkpoint[operation] = seconds
                ops.append(CheckpointOp(rank=state.rank, step=step, operation=operation, seconds=seconds))
    if ops:
        changes["checkpoint_seconds"] = checkpoint
    outage = _number(record.get(_STORAGE_OUTAGE), _STORAGE_OUTAGE)
    if outage is not None:
        # Each line in an outage is a sign of life (the trainer writes them while it waits for the storage).
        changes["storage_outage_seconds"] = outage
        changes["storage_wait_at"] = _number(record.get("time"), "time") if outage > 0 else None
    sample = None
    if "step_seconds" in record:  # a step line (the others are checkpoint lines)
        wall = _number(record["step_seconds"], "step_seconds")
        own = _number(record.get("own_work_seconds"), "own_work_seconds")
        phases = {}
        for phase in PHASES:
            seconds = _number(record.get(_PHASE_PREFIX + phase), _PHASE_PREFIX + phase)
            if seconds is not None:
                phases[phase] = seconds
        text = _number(record.get("text_tokens"), "text_tokens") or 0.0
        vision = _number(record.get("vision_tokens"), "vision_tokens") or 0.0
        progress = _number(record.get("last_progress_timestamp_seconds"), "last_progress_timestamp_seconds")
        changes.update(
            step=step,
            step_seconds=wall,
            own_work_seconds=own,
            phase_seconds=phases,
            loss=_finite(_number(record.get("loss"), "loss")),
            text_tokens_total=state.text_tokens_total + text,
            vision_tokens_total=state.vision_tokens_total + vision,
            tokens_per_second=(text + vision) / wall if wall else None,
            last_progress=progress if progress is not None else _number(record.get("time"), "time"),
        )
        sample = StepSample(
            rank=state.rank,
            node=state.node,
            step=step,
            own_work_seconds=own,
            phase_seconds=_own_phases(phases),
            wall_seconds=wall,
            attempt=state.attempt,
        )
    if changes and now is not None:
        changes["updated_at"] = now
    return (replace(state, **changes) if changes else state), sample, ops


# ------------------------------------------------------------------------------------------------ scrapes


class _ScrapedRanks:
    """Rank states built from whole-rank snapshots (an endpoint scrape, a Prometheus query)."""

    def __init__(self, attempt: int):
        self.attempt = attempt
        self.states: dict[int, RankState] = {}

    def observe(
        self, sample: RankSample, now: float, steps: list[StepSample], ops: list[CheckpointOp]
    ) -> None:
        prev = self.states.get(sample.rank)
        checkpoint = {op: v for op, v in sample.checkpoint_seconds.items() if op in CHECKPOINT_OPERATIONS}
        before = prev.checkpoint_seconds if prev is not None else {}
        changed = [
            op for op in CHECKPOINT_OPERATIONS if op in checkpoint and before.get(op) != checkpoint[op]
        ]
        step = sample.step
        ops.extend(
            CheckpointOp(rank=sample.rank, step=step or 0, operation=op, seconds=checkpoint[op])
            for op in changed
        )
        advanced = step is not None and (prev is None or prev.step is None or step > prev.step)
        text = sample.text_tokens_total or 0.0
        vision = sample.vision_tokens_total or 0.0
        rate = prev.tokens_per_second if prev is not None else None
        if advanced and prev is not None and prev.step is not None and sample.step_seconds:
            gained = text + vision - prev.text_tokens_total - prev.vision_tokens_total
            rate = max(gained, 0.0) / (step - prev.step) / sample.step_seconds
        phases = {p: v for p, v in sample.phase_seconds.items() if p in PHASES}
        outage = sample.checkpoint_storage_outage_seconds
        # A growing outage gauge is a sign of life; a frozen one (the training thread stuck) is not.
        wait_at = None
        if outage is not None and outage > 0:
            grew = prev is None or prev.storage_outage_seconds is None or outage > prev.storage_outage_seconds
            wait_at = now if grew else (prev.storage_wait_at if prev is not None else None)
        self.states[sample.rank] = RankState(
            rank=sample.rank,
            attempt=self.attempt,
            node=sample.node,
            pid=sample.pid,
            step=step,
            last_progress=sample.last_progress_timestamp_seconds,
            process_start=sample.process_start_time_seconds,
            step_seconds=sample.step_seconds,
            own_work_seconds=sample.own_work_seconds,
            phase_seconds=phases,
            loss=_finite(sample.loss),
            text_tokens_total=text,
            vision_tokens_total=vision,
            tokens_per_second=rate,
            checkpoint_seconds=checkpoint,
            storage_outage_seconds=outage,
            storage_wait_at=wait_at,
            updated_at=now,
        )
        if advanced and sample.step_seconds is not None:
            steps.append(
                StepSample(
                    rank=sample.rank,
                    node=sample.node,
                    step=step,
                    own_work_seconds=sample.own_work_seconds,
                    phase_seconds=_own_phases(phases),
                    wall_seconds=sample.step_seconds,
                    is_checkpoint_step=any(op in SAVING_OPERATIONS for op in changed),
                    attempt=self.attempt,
                )
            )

    def fail(self, rank: int) -> None:
        prev = self.states.get(rank)
        if prev is not None:
            self.states[rank] = replace(prev, failures=prev.failures + 1)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size) of the file it was read from
    url: str | None
    attempt: int


class EndpointTelemetry:
    """Scrapes every rank's endpoint of the attempt, concurrently; a failed scrape keeps the rank's state."""

    def __init__(
        self,
        run_dir: str | Path,
        num_ranks: int,
        attempt: int,
        *,
        timeout_seconds: float = 2.0,
        max_workers: int = 32,
    ):
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        if not timeout_seconds > 0:
            raise ValueError(f"timeout_seconds: must be > 0, got {timeout_seconds}")
        if max_workers < 1:
            raise ValueError(f"max_workers: must be >= 1, got {max_workers}")
        self.run_dir = Path(run_dir)
        self.num_ranks = num_ranks
        self.attempt = attempt
        self.timeout_seconds = timeout_seconds
        self.failures_total = 0  # failed scrapes since construction
        self._paths = [self.run_dir / ENDPOINT_FILE.format(rank=r) for r in range(num_ranks)]
        self._endpoints: list[_Endpoint | None] = [None] * num_ranks
        self._ranks = _ScrapedRanks(attempt)
        self._pool = ThreadPoolExecutor(max_workers=min(max_workers, num_ranks), thread_name_prefix="scrape")

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        self.attempt = attempt
        self._ranks = _ScrapedRanks(attempt)

    def poll(self, now: float) -> TelemetryUpdate:
        failed: dict[int, str] = {}
        targets = []
        for rank in range(self.num_ranks):
            try:
                endpoint = self._endpoint(rank)
            except ValueError as e:
                failed[rank] = str(e)
                continue
            if endpoint is not None and endpoint.attempt == self.attempt and endpoint.url:
                targets.append((rank, endpoint.url))
        steps: list[StepSample] = []
        ops: list[CheckpointOp] = []
        results = self._pool.map(lambda t: self._scrape(*t), targets)
        for (rank, _), (sample, error) in zip(targets, results, strict=True):
            if sample is not None:
                self._ranks.observe(sample, now, steps, ops)
            else:
                failed[rank] = error
        for rank in failed:
            self._ranks.fail(rank)
        self.failures_total += len(failed)
        return TelemetryUpdate(
            attempt=self.attempt,
            steps=steps,
            ranks=dict(self._ranks.states),
            checkpoint_ops=ops,
            failed=failed,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def state_nbytes(self) -> int:
        return deep_sizeof(self._endpoints) + deep_sizeof(self._ranks.states)

    def _endpoint(self, rank: int) -> _Endpoint | None:
        """The rank's endpoint file, read again only when it changed; None before the rank serves."""
        path = self._paths[rank]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._endpoints[rank]
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            url, attempt = info.get("url"), info.get(ATTEMPT_KEY, 0)
        except (OSError, ValueError, AttributeError):
            raise ValueError(f"{path.name}: not a JSON object with a url") from None
        if not isinstance(url, str) or not isinstance(attempt, int):
            raise ValueError(f"{path.name}: url must be a string and attempt an integer")
        self._endpoints[rank] = _Endpoint(stamp=stamp, url=url, attempt=attempt)
        return self._endpoints[rank]

    def _scrape(self, rank: int, url: str) -> tuple[RankSample | None, str]:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as response:
                text = response.read().decode("utf-8")
            samples = [s for s in parse_rank_metrics(text) if s.rank == rank]
        except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts: OSErrors
            return None, f"{url}: {getattr(e, 'reason', None) or e}"
        if not samples:
            return None, f"{url}: no {PREFIX}* series for rank {rank}"
        return samples[0], ""


# ------------------------------------------------------------------------------------------------ Prometheus

# The series the ingest reads (what RankState holds); the rest of the contract stays on the server.
_UNREAD = ("mfu", "sync_wait_seconds", "micro_steps_total")
_QUERIED = tuple(m.name for m in METRICS if m.field not in _UNREAD)
_METRIC_LABELS = ("__name__", PHASE_LABEL, CHECKPOINT_LABEL)  # the rest of a label set names the process


class PrometheusTelemetry:
    """Reads the attempt's ranks through a Prometheus server's instant-query API."""

    def __init__(
        self,
        base_url: str,
        training_job: str,
        attempt: int,
        num_ranks: int,
        *,
        launched_at: float | None = None,
        clock_skew_seconds: float = 5.0,
        timeout_seconds: float = 10.0,
    ):
        """launched_at: when the attempt was launched; series of processes started more than
        clock_skew_seconds before it belong to an earlier attempt and are skipped."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: expected an http(s) URL, got {base_url!r}")
        if not training_job:
            raise ValueError("training_job: must not be empty")
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        self.base_url = base_url.rstrip("/")
        self.training_job = training_job
        self.attempt = attempt
        self.num_ranks = num_ranks
        self.launched_at = launched_at
        self.clock_skew_seconds = clock_skew_seconds
        self.timeout_seconds = timeout_seconds
        self.failures_total = 0  # failed queries since construction
        self._ranks = _ScrapedRanks(attempt)
        job = training_job.replace("\\", "\\\\").replace('"', '\\"')
        self.query = f'{{__name__=~"{"|".join(_QUERIED)}", {LABEL_TRAINING_JOB}="{job}"}}'

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        self.attempt = attempt
        self.launched_at = launched_at
        self._ranks = _ScrapedRanks(attempt)

    def poll(self, now: float) -> TelemetryUpdate:
        steps: list[StepSample] = []
        ops: list[CheckpointOp] = []
        try:
            samples = self.rank_samples(self.fetch())
        except (OSError, ValueError, http.client.HTTPException) as e:
            self.failures_total += 1
            return TelemetryUpdate(
                attempt=self.attempt,
                steps=steps,
                ranks=dict(self._ranks.states),
                checkpoint_ops=ops,
                error=f"{self.base_url}: {getattr(e, 'reason', None) or e}",
            )
        for sample in samples:
            self._ranks.observe(sample, now, steps, ops)
        return TelemetryUpdate(
            attempt=self.attempt, steps=steps, ranks=dict(self._ranks.states), checkpoint_ops=ops
        )

    def close(self) -> None:
        pass

    @property
    def state_nbytes(self) -> int:
        return deep_sizeof(self._ranks.states)

    def fetch(self) -> list[dict]:
        """The instant vector of the job's series, as the API returns it."""
        url = f"{self.base_url}/api/v1/query?" + urllib.parse.urlencode({"query": self.query})
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_seconds) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:  # the API explains a bad query in a JSON body
            try:
                message = json.load(e).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise ValueError(f"query failed ({e.code}): {message}") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            raise ValueError(f"query failed: {body.get('error') if isinstance(body, dict) else body!r}")
        data = body.get("data")
        if (
            not isinstance(data, dict)
            or data.get("resultType") != "vector"
            or not isinstance(data.get("result"), list)
        ):
            raise ValueError("query failed: the answer is not an instant vector")
        return data["result"]

    def rank_samples(self, results: Sequence[Mapping[str, Any]]) -> list[RankSample]:
        """An instant vector -> one RankSample per rank of this attempt (the newest process where a rank has
        several). Series without a usable rank label, or outside the job's ranks, are skipped with a warning."""
        processes: dict[tuple, RankSample] = {}
        outside = set()
        for series in results:
            try:
                labels, value = dict(series["metric"]), float(series["value"][1])  # "NaN" is a string too
            except (KeyError, IndexError, TypeError, ValueError):
                raise ValueError(f"not a sample of an instant vector: {str(series)[:200]}") from None
            spec = METRICS_BY_NAME.get(labels.get("__name__", ""))
            if spec is None:
                continue
            try:
                rank = int(labels[LABEL_RANK])
                local_rank = int(labels.get(LABEL_LOCAL_RANK, "0"))
            except (KeyError, ValueError):
                outside.add(labels.get(LABEL_RANK))
                continue
            if not 0 <= rank < self.num_ranks:
                outside.add(rank)
                continue
            key = tuple(sorted((k, v) for k, v in labels.items() if k not in _METRIC_LABELS))
            sample = processes.get(key)
            if sample is None:
                sample = processes[key] = RankSample(
                    training_job=labels.get(LABEL_TRAINING_JOB, ""),
                    node=labels.get(LABEL_NODE, ""),
                    rank=rank,
                    local_rank=local_rank,
                )
            if spec.label:
                if spec.label in labels:
                    getattr(sample, spec.field)[labels[spec.label]] = value
            elif spec.field in ("step", "pid"):
                setattr(sample, spec.field, int(value) if math.isfinite(value) else None)
            else:
                setattr(sample, spec.field, value)
        if outside:
            log.warning(
                "%s: skipped series with rank label(s) %s, outside 0..%d",
                self.training_job,
                ", ".join(sorted(map(str, outside))[:8]),
                self.num_ranks - 1,
            )
        newest: dict[int, RankSample] = {}
        oldest_allowed = None if self.launched_at is None else self.launched_at - self.clock_skew_seconds
        for sample in processes.values():
            started = sample.process_start_time_seconds
            if oldest_allowed is not None and started is not None and started < oldest_allowed:
                continue  # a process of an earlier attempt, not yet stale in Prometheus
            best = newest.get(sample.rank)
            if best is None or (started or -math.inf) > (best.process_start_time_seconds or -math.inf):
                newest[sample.rank] = sample
        return [newest[r] for r in sorted(newest)]
