"""Hang detection: has the job stopped making progress, which ranks stopped, and which stopped first.

Decisions:

- The signal is each rank's last-progress timestamp (a completed step or micro-step, see
  trainer.contract.telemetry). A live, scrapable endpoint with a stale timestamp is a hang; a dead process is
  the backend's business (an exit code), not this module's.
- A rank waiting for its checkpoint storage (an outage: it retries the save with backoff, and after the last step
  it takes no step while it waits) is not hung: its reports of the growing outage count as progress. The wait is
  bounded by the trainer itself (checkpoint.storage_outage_seconds, then it exits StorageUnavailable), so a job
  whose storage is down is never killed as hung and recomputed from an older checkpoint.
- The job is hung when no rank has progressed for max(hang_timeout_seconds, step_time_factor x the median step
  time): one rank stuck in a collective stops every other rank within a step, so "newest progress of any rank"
  is the job's progress, and the step-time term keeps a job whose steps take longer than the timeout from being
  killed between two steps.
- Start-up is judged apart, while no rank has progressed in this attempt: the clock starts when the last process
  of the gang started (the gang cannot take a step before its last member is up; a rank that has not reported
  counts from the attempt's launch) and the limit is startup_timeout_seconds, which covers imports, rendezvous,
  checkpoint load and the first step's compilation.
- So is the end: once every rank has taken the job's last step, no step will come, and what is left (the final
  checkpoint's save and commit, the exit barrier, tearing down process groups and loader workers) is measured
  against startup_timeout_seconds too, from the last step. A short hang timeout (seconds, for a small model)
  must not call a gang that is saving and exiting hung (seen under load: 6 s of teardown after the last step
  against an 8 s timeout); a gang stuck in its exit barrier is still stopped.
- The ranks that stopped first are the likely culprits (the others stopped when they blocked on them): those
  whose last progress is within half a median step of the oldest. A rank that never progressed while others did
  sorts first, with its process start as its time.
- Timestamps come from the ranks' clocks and `now` from the controller's; skew is far below the timeouts.
  Negative ages (a clock ahead of ours) count as zero.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from trainer.contract.telemetry import RankSample

PHASE_STARTUP = "startup"
PHASE_TRAINING = "training"
PHASE_FINISHING = "finishing"
HangPhase = Literal["startup", "training", "finishing"]


@dataclass(kw_only=True, slots=True)
class HangConfig:
    hang_timeout_seconds: float = 600.0
    step_time_factor: float = 10.0  # k: also wait k median steps, for jobs whose steps are long
    startup_timeout_seconds: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("hang_timeout_seconds", "step_time_factor", "startup_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass(kw_only=True, slots=True, frozen=True)
class RankProgress:
    rank: int
    node: str = ""
    step: int | None = None  # last completed step
    last_progress: float | None = None  # unix seconds; None before the first step or micro-step
    process_start: float | None = None  # unix seconds; None until the rank has reported
    storage_wait_at: float | None = None  # unix seconds: its newest report of a checkpoint storage outage

    @property
    def alive_at(self) -> float | None:
        """The newest sign that the rank is doing its work: a step, or waiting out a storage outage."""
        return alive_at(self)

    @classmethod
    def from_sample(cls, sample: RankSample) -> RankProgress:
        return cls(
            rank=sample.rank,
            node=sample.node,
            step=sample.step,
            last_progress=sample.last_progress_timestamp_seconds,
            process_start=sample.process_start_time_seconds,
        )


class ProgressLike(Protocol):
    """What the hang check reads of a rank: a RankProgress, or the ingest's RankState as it is (building a
    RankProgress per rank every pass was a large part of the pass at 16,384 ranks)."""

    @property
    def rank(self) -> int: ...
    @property
    def node(self) -> str: ...
    @property
    def step(self) -> int | None: ...
    @property
    def last_progress(self) -> float | None: ...
    @property
    def process_start(self) -> float | None: ...
    @property
    def storage_wait_at(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class ProgressColumns:
    """What the hang check reads of the ranks, as arrays in rank order: NaN (times) or -1 (step) where none."""

    rank: np.ndarray  # int
    node: np.ndarray  # str
    step: np.ndarray  # int, -1: no step yet
    last_progress: np.ndarray
    process_start: np.ndarray
    storage_wait_at: np.ndarray

    def __len__(self) -> int:
        return int(self.rank.size)

    @classmethod
    def of(cls, ranks: Sequence[ProgressLike]) -> ProgressColumns:
        def times(values: list[float | None]) -> np.ndarray:
            return np.array([math.nan if v is None else v for v in values], dtype=np.float64)

        return cls(
            rank=np.array([r.rank for r in ranks], dtype=np.int64),
            node=np.array([r.node for r in ranks], dtype=str),
            step=np.array([-1 if r.step is None else r.step for r in ranks], dtype=np.int64),
            last_progress=times([r.last_progress for r in ranks]),
            process_start=times([r.process_start for r in ranks]),
            storage_wait_at=times([r.storage_wait_at for r in ranks]),
        )


def alive_times(last_progress: np.ndarray, storage_wait_at: np.ndarray) -> np.ndarray:
    """Each rank's newest sign that it is doing its work: its progress, or a later report of waiting out a
    storage outage (NaN: none yet)."""
    waiting = ~np.isnan(storage_wait_at) & ~(last_progress >= storage_wait_at)
    return np.where(waiting, storage_wait_at, last_progress)


def alive_at(rank: ProgressLike) -> float | None:
    """One rank's `alive_times`."""
    c = ProgressColumns.of([rank])
    value = float(alive_times(c.last_progress, c.storage_wait_at)[0])
    return None if math.isnan(value) else value


@dataclass(frozen=True, slots=True)
class StaleRank:
    rank: int
    node: str
    step: int | None
    since: float  # its last progress, or its process start (launch) when it never progressed
    seconds: float  # now - since
    progressed: bool


@dataclass(frozen=True, slots=True)
class HangVerdict:
    hung: bool
    phase: HangPhase
    threshold_seconds: float
    since: float  # the job's last progress (start-up: when its last process started)
    idle_seconds: float  # now - since
    stale: tuple[StaleRank, ...]  # ranks idle past the threshold, oldest first
    first_stalled: tuple[int, ...]  # the likely culprits (see module docstring)

    @property
    def hung_at(self) -> float:
        """When the job became hung by the rule: its last progress plus the limit."""
        return self.since + self.threshold_seconds

    @property
    def message(self) -> str:
        if self.phase == PHASE_STARTUP:
            head = f"no rank finished a step within {self.idle_seconds:.0f} s of start-up"
        elif self.phase == PHASE_FINISHING:
            head = f"the gang has not exited {self.idle_seconds:.0f} s after the last step"
        else:
            head = f"no rank made progress for {self.idle_seconds:.0f} s"
        text = f"{head} (limit {self.threshold_seconds:.0f} s)"
        culprits = [s for s in self.stale if s.rank in self.first_stalled]
        if culprits:
            names = ", ".join(describe(s) for s in culprits[:4])
            more = f" and {len(culprits) - 4} more" if len(culprits) > 4 else ""
            text += f"; stopped first: {names}{more}"
        return text


def describe(rank: StaleRank) -> str:
    text = f"rank {rank.rank}" + (f" on {rank.node}" if rank.node else "")
    if not rank.progressed:
        return text + ", no step yet"
    return text + (f" at step {rank.step}" if rank.step is not None else "")


def detect_hang(
    ranks: Sequence[ProgressLike] | ProgressColumns,
    *,
    now: float,
    launched_at: float,
    median_step_seconds: float | None,
    config: HangConfig,
    last_step: int | None = None,
) -> HangVerdict:
    """`ranks`: the live ranks of the current attempt (objects, or their columns: the controller's pass at
    16,384 ranks); `median_step_seconds`: the job's so far (None: no step yet); `launched_at`: when the attempt
    was launched; `last_step`: the index of the job's final step (None: unknown), past which the gang is
    finishing, not training."""
    if median_step_seconds is not None and not median_step_seconds >= 0:
        raise ValueError(f"median_step_seconds: must be >= 0, got {median_step_seconds}")
    c = ranks if isinstance(ranks, ProgressColumns) else ProgressColumns.of(ranks)
    # Each rank's newest sign of life: its progress, or a later report of waiting out a storage outage.
    alive = alive_times(c.last_progress, c.storage_wait_at)
    progressed = ~np.isnan(alive)
    started = c.process_start[~np.isnan(c.process_start)]
    since_of = np.where(progressed, alive, np.where(np.isnan(c.process_start), launched_at, c.process_start))

    finishing = last_step is not None and len(c) > 0 and bool(np.all(c.step >= max(last_step, 0)))
    if progressed.any() and finishing:
        phase: HangPhase = PHASE_FINISHING
        since = float(alive[progressed].max())
        threshold = config.startup_timeout_seconds
    elif progressed.any():
        phase = PHASE_TRAINING
        since = float(alive[progressed].max())
        threshold = max(config.hang_timeout_seconds, config.step_time_factor * (median_step_seconds or 0.0))
    else:
        phase = PHASE_STARTUP
        since = max(launched_at, float(started.max())) if started.size else launched_at
        threshold = config.startup_timeout_seconds
    idle = max(0.0, now - since)

    over = np.flatnonzero(now - since_of > threshold)  # usually none: objects only for the stale
    stale = sorted(
        (
            StaleRank(
                rank=int(c.rank[i]),
                node=str(c.node[i]),
                step=int(c.step[i]) if c.step[i] >= 0 else None,
                since=float(since_of[i]),
                seconds=max(0.0, now - float(since_of[i])),
                progressed=bool(progressed[i]),
            )
            for i in over.tolist()
        ),
        key=lambda s: (s.progressed, s.since, s.rank),  # never progressed while others did: first
    )
    first_stalled: tuple[int, ...] = ()
    if stale:
        head = stale[0]
        tolerance = 0.5 * (median_step_seconds or 0.0)
        first_stalled = tuple(
            s.rank for s in stale if s.progressed == head.progressed and s.since <= head.since + tolerance
        )
    return HangVerdict(
        hung=idle > threshold,
        phase=phase,
        threshold_seconds=threshold,
        since=since,
        idle_seconds=idle,
        stale=tuple(stale),
        first_stalled=first_stalled,
    )


# A main thread in one of these frames is waiting on other ranks (a collective, a pipeline transfer, a snapshot
# replica's exchange), not stuck on its own.
_WAITING_ON_PEERS = ("torch/distributed/", "deepspeed/comm/", "settle_replicas", "Replicator.drain")


def waiting_on_peers(stacks: str) -> bool:
    """Whether a py-spy dump shows the main thread blocked on other ranks."""
    main, inside = [], False
    for line in stacks.splitlines():
        if line.startswith("Thread "):
            inside = '"MainThread"' in line
        elif inside:
            main.append(line)
    return any(marker in line for line in main for marker in _WAITING_ON_PEERS)


def hang_culprits(
    first_stalled: Sequence[int], *, stacks: Mapping[int, str], stopped: Collection[int] = ()
) -> tuple[int, ...]:
    """The ranks to blame for a hang, sharper than the progress timestamps alone: a step that starts with a
    collective stops every rank at the same moment, so `first_stalled` may hold the whole job. A stopped process
    is to blame; otherwise, of the first stalled, those whose main thread is not waiting on other ranks (their
    stacks show it). When the stacks tell nothing (none, or everyone waits), `first_stalled` as it was."""
    if stopped:
        return tuple(sorted(stopped))
    stuck = tuple(r for r in first_stalled if r in stacks and not waiting_on_peers(stacks[r]))
    return stuck or tuple(first_stalled)


def hang_failed_at(verdict: HangVerdict) -> float:
    """The failure time of a hang, for the goodput ledger: while training, the last progress (nothing was
    trained while the controller waited out the limit: that wait is detection, not running time); before the
    first step or after the last, when the rule was met (no training to lose, so the wait stays where it was:
    start-up, or the end of the job)."""
    return verdict.since if verdict.phase == PHASE_TRAINING else verdict.hung_at
