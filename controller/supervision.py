"""One running attempt as the controller watches it: its gang, its telemetry, and what they say.

`LiveAttempt` is the in-memory side of a job in launching/running: the backend's handle, the telemetry source,
the straggler detector, and the few numbers the loop needs between passes (first step time, checkpoint stalls,
stragglers already reported). Everything here can be rebuilt from the store and the ranks' own records, which
is what a restarted controller does (`LiveAttempt` is created again from the attempt's backend record and the
telemetry is re-read): losing this object loses nothing but a few seconds of straggler evidence.

Decisions:

- The straggler detector is fed every step sample the source reports; a rank is reported once when it is
  flagged (an event), then carried in `flagged` until a window clears it, so the timeline is not flooded; a
  slow node likewise (`slow_nodes`). Each closed window is recorded in the store for the dashboard's heatmap
  (`window_records`: per rank up to WINDOW_RECORD_RANKS ranks, per node beyond).
- Step progress for status (step, loss, tokens/s) is the slowest rank's step and the mean loss over ranks at
  that step (`step_progress`: the one definition of a job's step and loss from its ranks); tokens/s is the rate
  of rank 0's token counters over the last steps times the data-parallel size (rank 0 sees every token of its
  replica whatever the tensor and pipeline split; other ranks of the replica see the same tokens and must not
  be added).
- Time blocked by checkpoints is the `stage` operation (the synchronous part of an async save, the whole save
  when synchronous) on rank 0: ranks stage together, and counting one rank keeps the sum honest.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from controller.backends.base import GangHandle
from controller.hangs import HangConfig, HangVerdict, detect_hang
from controller.ingest import RankState, RankStates, TelemetrySource, TelemetryUpdate
from controller.store.records import RankRows, RankWindowStats
from controller.stragglers import StepBatch, StragglerConfig, StragglerDetector, StragglerReport, WindowResult

RECENT_STEPS = 50  # step times kept for the median (hang threshold, ETA)
WINDOW_RECORD_RANKS = 64  # a job of up to this many ranks records every rank's window; larger: per node
KEEP_WINDOWS = 60  # the newest windows a job keeps in the store (flagged ones stay: controller.store.records)


class StepProgress(NamedTuple):
    step: int | None  # steps done: the slowest rank's step index + 1; None before any rank finished a step
    loss: float | None  # mean over the ranks at that step that reported a finite loss


def step_progress(ranks: RankStates | Iterable[RankState]) -> StepProgress:
    """A job's step and loss from its ranks' newest states (the module's "Step progress")."""
    if isinstance(ranks, RankStates):
        c = ranks.columns
        return _step_progress(c.step[c.reported], c.loss[c.reported])
    states = list(ranks)
    return _step_progress(
        np.array([-1 if s.step is None else s.step for s in states], dtype=np.int64),
        np.array([math.nan if s.loss is None else s.loss for s in states], dtype=np.float64),
    )


def _step_progress(step: np.ndarray, loss: np.ndarray) -> StepProgress:
    """step: -1 where a rank has not finished one; loss: NaN where none."""
    done = step >= 0
    if not done.any():
        return StepProgress(None, None)
    # Telemetry numbers a step by its index (0 for the first); progress counts steps done, like the trainer's
    # checkpoint steps and `training.steps`.
    slowest = int(step[done].min())
    losses = loss[(step == slowest) & ~np.isnan(loss)]
    return StepProgress(slowest + 1, statistics.fmean(losses.tolist()) if losses.size else None)


@dataclass(kw_only=True)
class Progress:
    step: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    median_step_seconds: float | None = None
    first_step_at: float | None = None  # unix seconds: the attempt's first completed step
    last_progress_at: float | None = None


@dataclass(kw_only=True)
class LiveAttempt:
    job_id: int
    job_name: str
    attempt: int
    num_ranks: int
    dp: int  # data-parallel replicas: rank 0 counts the tokens of one of them
    gang: GangHandle
    telemetry: TelemetrySource
    launched_at: float  # unix seconds
    stragglers: StragglerConfig
    hang: HangConfig
    total_steps: int | None = None  # the job's `training.steps`: past its last, the gang is finishing
    progress: Progress = field(default_factory=Progress)
    flagged: dict[int, StragglerReport] = field(default_factory=dict)  # rank -> its newest report
    slow_nodes: set[str] = field(default_factory=set)  # nodes slow in the newest window (reported once each)
    checkpoint_stall_seconds: float = 0.0
    straggler_seconds: float = 0.0
    stage_seconds_by_step: dict[int, float] = field(default_factory=dict)
    stopped_by_controller: bool = False  # a controller stopped the ranks on its way out: a preemption
    ranks: RankStates = field(default_factory=RankStates.empty)  # rank -> the source's newest state
    # In-place recoveries decided and not yet finished (controller/inplace.py): round, node, spare, times
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    spare_due_after: float | None = None  # unix seconds: a spare is to be started once a step ends after this
    # The newest reported step when each finished in-place recovery's failure was seen (the crash-loop guard).
    in_place_failure_steps: list[int] = field(default_factory=list)
    # A node killed for a hang, to be replaced in place: node -> its failure time (the last progress).
    hung_since: dict[str, float] = field(default_factory=dict)
    # A failed node whose replacement waits for a spare still starting: node -> since when (unix seconds).
    awaiting_spare: dict[str, float] = field(default_factory=dict)
    coordinator_exit: int | None = None  # the recovery coordinator's exit code once seen ended
    hang_quiet_until: float = (
        0.0  # unix seconds: no hang verdict acted on before (an in-place recovery's wait)
    )
    rank_store: RankRows = field(init=False)  # writes the rank_status rows within their budget
    _detector: StragglerDetector | None = None
    _step_times: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))
    _tokens: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=RECENT_STEPS))

    def __post_init__(self) -> None:
        self._detector = StragglerDetector(self.stragglers, num_ranks=self.num_ranks)
        self.rank_store = RankRows(self.num_ranks)

    @property
    def scores(self) -> dict[int, float]:
        assert self._detector is not None
        return {r: float(v) for r, v in enumerate(self._detector.scores) if v == v}  # NaN: not evaluated

    def reassign(self, rank_nodes: Sequence[str]) -> None:
        """In-place recovery moved ranks to another node: the telemetry and the known states name it."""
        if (reassign := getattr(self.telemetry, "reassign", None)) is not None:
            reassign(rank_nodes)
        if self.ranks.columns.num_ranks:  # the source's own columns (renamed already) or a copy of its states
            self.ranks.columns.reassign(rank_nodes)

    def absorb(self, update: TelemetryUpdate) -> tuple[list[StragglerReport], list[WindowResult]]:
        """Take one poll's telemetry in; returns the ranks newly flagged and the windows that closed."""
        assert self._detector is not None
        self.ranks = update.ranks  # every rank that has reported in the attempt, as the source holds them
        batch = update.batch
        for op in update.checkpoint_ops:
            if op.operation == "stage" and op.rank == 0:
                self.checkpoint_stall_seconds += op.seconds
                self.stage_seconds_by_step[op.step] = op.seconds
        self._step_times.extend(
            batch.wall_seconds[(batch.rank == 0) & ~np.isnan(batch.wall_seconds)].tolist()
        )
        windows = self._detector.observe(batch) if len(batch) else []
        newly: list[StragglerReport] = []
        for window in windows:
            current = {r.rank: r for r in window.stragglers}
            newly.extend(r for rank, r in current.items() if rank not in self.flagged)
            self.flagged = current
            if current:
                slowest = max(r.own_work_seconds for r in current.values())
                steps = window.last_step - window.first_step + 1
                self.straggler_seconds += steps * max(0.0, slowest - window.median_seconds)
        self._update_progress(update)
        return newly, windows

    def _update_progress(self, update: TelemetryUpdate) -> None:
        p = self.progress
        step, loss = step_progress(self.ranks)
        if step is not None:
            p.step = step
            p.loss = loss if loss is not None else p.loss
        columns = self.ranks.columns
        progress = columns.last_progress[columns.reported & ~np.isnan(columns.last_progress)]
        if progress.size:
            p.last_progress_at = float(progress.max())
        if p.first_step_at is None and len(update.batch):
            p.first_step_at = _first_step_end(update.batch, p.last_progress_at)
        if self._step_times:
            p.median_step_seconds = statistics.median(self._step_times)
        rank0 = self.ranks.get(0)
        if rank0 is not None and rank0.last_progress is not None:
            tokens = (rank0.text_tokens_total or 0.0) + (rank0.vision_tokens_total or 0.0)
            if not self._tokens or self._tokens[-1][0] != rank0.last_progress:
                self._tokens.append((rank0.last_progress, tokens))
            if len(self._tokens) >= 2:
                (t0, n0), (t1, n1) = self._tokens[0], self._tokens[-1]
                if t1 > t0:
                    p.tokens_per_second = (n1 - n0) / (t1 - t0) * self.dp

    def window_records(self, window: WindowResult) -> list[RankWindowStats]:
        """What the store keeps of a closed window (the dashboard's heatmap): every evaluated rank of a job of
        up to WINDOW_RECORD_RANKS ranks; of a larger one, each node's slowest rank and every flagged rank, so the
        rows grow with the nodes (2,048 a window at 16,384 ranks), not the ranks."""
        flagged = {r.rank for r in window.stragglers}
        keep = np.arange(window.ranks.size)
        if self.num_ranks > WINDOW_RECORD_RANKS and window.ranks.size:
            # Sorted by node, then own work descending: each node's first row is its slowest rank.
            order = np.lexsort((-window.own_seconds, window.rank_nodes))
            first = np.append(True, window.rank_nodes[order][1:] != window.rank_nodes[order][:-1])
            chosen = set(order[first].tolist())
            chosen.update(i for i, r in enumerate(window.ranks.tolist()) if r in flagged)
            keep = np.array(sorted(chosen), dtype=np.int64)
        steps = window.last_step - window.first_step + 1
        return [
            RankWindowStats(
                rank=rank,
                node=node,
                window_start_step=window.first_step,
                window_end_step=window.last_step,
                num_steps=steps,
                mean_own_s=mean,
                median_own_s=median,
                p90_own_s=p90,
                straggler_score=None if score != score else score,
                flagged=rank in flagged,
            )
            for rank, node, mean, median, p90, score in zip(
                window.ranks[keep].tolist(),
                window.rank_nodes[keep].tolist(),
                window.own_mean_seconds[keep].tolist(),
                window.own_seconds[keep].tolist(),
                window.own_p90_seconds[keep].tolist(),
                window.scores[keep].tolist(),
                strict=True,
            )
        ]

    def check_hang(self, now: float) -> HangVerdict:
        return detect_hang(
            self.ranks.columns.progress(),
            now=now,
            launched_at=self.launched_at,
            median_step_seconds=self.progress.median_step_seconds,
            config=self.hang,
            last_step=self.total_steps - 1 if self.total_steps else None,
        )

    def rank_rows(self, pids: dict[int, int]) -> Iterable[dict[str, Any]]:
        scores = self.scores
        c = self.ranks.columns
        known = c.num_ranks
        # Lists of Python values, once: a numpy scalar per field per rank was most of this at 16,384 ranks.
        reported = c.reported.tolist()
        node, pid, step = c.node.tolist(), c.pid.tolist(), c.step.tolist()
        last, own, wall, loss = (
            a.tolist() for a in (c.last_progress, c.own_work_seconds, c.step_seconds, c.loss)
        )

        def value(x: float) -> float | None:
            return None if x != x else x

        for rank in range(self.num_ranks):
            if rank >= known or not reported[rank]:
                yield {
                    "rank": rank,
                    "node": "",
                    "pid": pids.get(rank),
                    "step": None,
                    "last_progress": None,
                    "own_work_s": None,
                    "step_s": None,
                    "loss": None,
                    "straggler_score": scores.get(rank),
                    "flagged": rank in self.flagged,
                }
                continue
            yield {
                "rank": rank,
                "node": node[rank],
                "pid": pids.get(rank, pid[rank] if pid[rank] >= 0 else None),
                "step": step[rank] if step[rank] >= 0 else None,
                "last_progress": value(last[rank]),
                "own_work_s": value(own[rank]),
                "step_s": value(wall[rank]),
                "loss": value(loss[rank]),
                "straggler_score": scores.get(rank),
                "flagged": rank in self.flagged,
            }


def _first_step_end(batch: StepBatch, newest: float | None) -> float | None:
    """When the first step of a poll's samples ended: a poll that read several steps ends at the newest
    progress, and the first step ended the later steps' wall time before it (ranks step together)."""
    if newest is None:
        return None
    first = int(batch.step.min())
    later = (batch.step > first) & ~np.isnan(batch.wall_seconds)
    if not later.any():
        return newest
    steps, at = np.unique(batch.step[later], return_inverse=True)
    slowest = np.zeros(steps.size)
    np.maximum.at(slowest, at, batch.wall_seconds[later])
    return newest - sum(slowest.tolist())
