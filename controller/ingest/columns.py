"""Every rank's newest telemetry in columns: one numpy array per field, indexed by global rank.

A source keeps one `RankColumns` for its attempt and writes into it; readers get `RankStates`, a read-only
mapping rank -> `RankState` over the same arrays that builds a rank's state when it is asked for, and read the
arrays themselves where they look at every rank (the job's step and loss, the hang check, the rank rows).

Decisions:

- Columns, not an object per rank (issue 14: <= 2 KB a rank at 16,384 ranks). A frozen RankState per rank,
  rebuilt every step with its float objects and phase dict, lived twice during a pass (the source's new states
  next to the attempt's old ones), and the pass walked them in Python: the controller held 1.75 KB a rank, 2.76
  KB at the peak of a pass, and the pass grew with exponent 1.15. In columns, written in place and read with
  numpy: 1.11 / 1.37 KB, exponent 0.85 (bench_controller_scale, docs/benchmarks.md).
- "Not reported" is NaN for a float, -1 for the step and the pid (neither is negative when reported), and a
  rank not reported at all is `reported[rank] == False`. Token totals start at 0, as RankState's do.
- Phase and checkpoint maps are fixed-width columns in the contract's order (PHASES, CHECKPOINT_OPERATIONS);
  NaN is a key the rank did not report.
- A view is valid until the source's next poll, which writes the same arrays; `dict(view)` keeps a copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from controller.hangs import ProgressColumns, RankProgress
from trainer.contract.telemetry import CHECKPOINT_OPERATIONS, OWN_WORK_PHASES, PHASES

NONE = -1  # the step or pid of a rank that has not reported one
PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}
OWN_WORK_COLUMNS = [PHASE_INDEX[p] for p in OWN_WORK_PHASES]  # phase_seconds[:, these]: the detector's
CHECKPOINT_INDEX = {op: i for i, op in enumerate(CHECKPOINT_OPERATIONS)}


def _nan(n: int) -> np.ndarray:
    return np.full(n, math.nan)


def _float_or_none(value: float) -> float | None:
    return None if value != value else float(value)  # NaN != NaN


def _int_or_none(value: int) -> int | None:
    return None if value < 0 else int(value)


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


class RankColumns:
    """The newest known telemetry of every rank of one attempt (the module's docstring)."""

    def __init__(self, num_ranks: int, attempt: int, nodes: Sequence[str] | None = None):
        if num_ranks < 0:
            raise ValueError(f"num_ranks: must be >= 0, got {num_ranks}")
        self.num_ranks = num_ranks
        self.attempt = attempt
        self.node = np.array(list(nodes) if nodes is not None else [""] * num_ranks, dtype=str)
        if self.node.size != num_ranks:
            raise ValueError(f"nodes: expected {num_ranks} names (one per rank), got {self.node.size}")
        self.clear(attempt)

    def clear(self, attempt: int) -> None:
        """Forget every rank's state (a new attempt); the nodes stay."""
        n = self.num_ranks
        self.attempt = attempt
        self.reported = np.zeros(n, dtype=bool)
        self.step = np.full(n, NONE, dtype=np.int64)
        self.pid = np.full(n, NONE, dtype=np.int64)
        self.failures = np.zeros(n, dtype=np.int32)
        self.last_progress = _nan(n)
        self.process_start = _nan(n)
        self.step_seconds = _nan(n)
        self.own_work_seconds = _nan(n)
        self.loss = _nan(n)  # NaN also for a non-finite loss
        self.text_tokens_total = np.zeros(n)
        self.vision_tokens_total = np.zeros(n)
        self.tokens_per_second = _nan(n)
        self.storage_outage_seconds = _nan(n)
        self.storage_wait_at = _nan(n)
        self.updated_at = _nan(n)
        self.phase_seconds = np.full((n, len(PHASES)), math.nan)
        self.checkpoint_seconds = np.full((n, len(CHECKPOINT_OPERATIONS)), math.nan)

    @classmethod
    def from_states(cls, attempt: int, states: Mapping[int, RankState]) -> RankColumns:
        """Columns holding `states` (a source that builds RankStates: tests, small fakes)."""
        n = max(states, default=-1) + 1
        nodes = [""] * n
        for rank, s in states.items():
            nodes[rank] = s.node
        columns = cls(n, attempt, nodes)
        for s in states.values():
            columns.set_state(s)
        return columns

    def view(self) -> RankStates:
        return RankStates(self)

    def reassign(self, nodes: Sequence[str]) -> None:
        """The ranks' nodes changed within the attempt (in-place recovery): ranks past `nodes` keep theirs."""
        names = self.node.tolist()
        names[: len(nodes)] = list(nodes)[: self.num_ranks]
        self.node = np.array(names, dtype=str)

    def set_node(self, rank: int, node: str) -> None:
        if len(node) > self.node.itemsize // 4:  # a longer name than the array holds: widen it
            self.node = self.node.astype(f"<U{len(node)}")
        self.node[rank] = node

    def state(self, rank: int) -> RankState:
        """Rank `rank`'s state, built from the columns (whether or not it has reported)."""
        phases = self.phase_seconds[rank].tolist()
        checkpoints = self.checkpoint_seconds[rank].tolist()
        return RankState(
            rank=rank,
            attempt=self.attempt,
            node=str(self.node[rank]),
            pid=_int_or_none(self.pid[rank]),
            step=_int_or_none(self.step[rank]),
            last_progress=_float_or_none(self.last_progress[rank]),
            process_start=_float_or_none(self.process_start[rank]),
            step_seconds=_float_or_none(self.step_seconds[rank]),
            own_work_seconds=_float_or_none(self.own_work_seconds[rank]),
            phase_seconds={p: v for p, v in zip(PHASES, phases, strict=True) if v == v},
            loss=_float_or_none(self.loss[rank]),
            text_tokens_total=float(self.text_tokens_total[rank]),
            vision_tokens_total=float(self.vision_tokens_total[rank]),
            tokens_per_second=_float_or_none(self.tokens_per_second[rank]),
            checkpoint_seconds={
                op: v for op, v in zip(CHECKPOINT_OPERATIONS, checkpoints, strict=True) if v == v
            },
            storage_outage_seconds=_float_or_none(self.storage_outage_seconds[rank]),
            storage_wait_at=_float_or_none(self.storage_wait_at[rank]),
            updated_at=_float_or_none(self.updated_at[rank]),
            failures=int(self.failures[rank]),
        )

    def set_state(self, s: RankState) -> None:
        """Write one rank's whole state (the scrape paths: a few hundred ranks a poll, or one query's worth)."""
        nan = math.nan
        r = s.rank
        if not 0 <= r < self.num_ranks:
            raise ValueError(f"rank: {r} is outside the job's {self.num_ranks} ranks")
        self.reported[r] = True
        self.set_node(r, s.node)
        self.pid[r] = NONE if s.pid is None else s.pid
        self.step[r] = NONE if s.step is None else s.step
        self.failures[r] = s.failures
        for name in (
            "last_progress",
            "process_start",
            "step_seconds",
            "own_work_seconds",
            "loss",
            "tokens_per_second",
            "storage_outage_seconds",
            "storage_wait_at",
            "updated_at",
        ):
            value = getattr(s, name)
            getattr(self, name)[r] = nan if value is None else value
        self.text_tokens_total[r] = s.text_tokens_total
        self.vision_tokens_total[r] = s.vision_tokens_total
        self.phase_seconds[r] = [s.phase_seconds.get(p, nan) for p in PHASES]
        self.checkpoint_seconds[r] = [s.checkpoint_seconds.get(op, nan) for op in CHECKPOINT_OPERATIONS]

    def progress(self) -> ProgressColumns:
        """The reported ranks' progress columns, in rank order (views when every rank has reported)."""
        if self.reported.all():
            return ProgressColumns(
                rank=np.arange(self.num_ranks),
                node=self.node,
                step=self.step,
                last_progress=self.last_progress,
                process_start=self.process_start,
                storage_wait_at=self.storage_wait_at,
            )
        at = np.flatnonzero(self.reported)
        return ProgressColumns(
            rank=at,
            node=self.node[at],
            step=self.step[at],
            last_progress=self.last_progress[at],
            process_start=self.process_start[at],
            storage_wait_at=self.storage_wait_at[at],
        )


class RankStates(Mapping[int, RankState]):
    """A read-only mapping rank -> RankState over a source's columns: the ranks that have reported."""

    __slots__ = ("columns",)

    def __init__(self, columns: RankColumns):
        self.columns = columns

    @classmethod
    def empty(cls) -> RankStates:
        return cls(RankColumns(0, 0))

    def __getitem__(self, rank: int) -> RankState:
        c = self.columns
        if not isinstance(rank, int | np.integer) or not 0 <= rank < c.num_ranks or not c.reported[rank]:
            raise KeyError(rank)
        return c.state(int(rank))

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self.columns.reported).tolist())

    def __len__(self) -> int:
        return int(np.count_nonzero(self.columns.reported))

    def __contains__(self, rank: object) -> bool:
        c = self.columns
        return isinstance(rank, int | np.integer) and 0 <= rank < c.num_ranks and bool(c.reported[rank])

    def __repr__(self) -> str:
        return f"RankStates({len(self)} of {self.columns.num_ranks} ranks, attempt {self.columns.attempt})"
