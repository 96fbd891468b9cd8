"""What every telemetry source reports (`TelemetryUpdate`), and how a whole-rank snapshot updates a rank.

A source keeps its ranks' newest telemetry in `columns.RankColumns` (fixed width per rank: nothing grows with
the steps). JSONL lines fold into it in `jsonl`; snapshots (an endpoint scrape, a Prometheus query) through
`ScrapedRanks` here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from controller.stragglers import StepBatch, StepSample
from trainer.contract.telemetry import CHECKPOINT_OPERATIONS, OWN_WORK_PHASES, PHASES, RankSample

from .columns import RankColumns, RankState, RankStates

ATTEMPT_KEY = "attempt"  # in JSONL lines and endpoint files (trainer.contract.telemetry.ENV_ATTEMPT)
SAVING_OPERATIONS = ("stage", "save")  # the operations that make a step a checkpoint step


@dataclass(frozen=True, slots=True)
class CheckpointOp:
    rank: int
    step: int
    operation: str  # one of CHECKPOINT_OPERATIONS
    seconds: float


class TelemetryUpdate:
    """One poll of a source: the step samples read since the previous poll, in columns (`batch`; `steps` builds
    StepSample objects from it, for readers of a few), and every rank's newest state (`ranks`: a view of the
    source's columns, valid until its next poll)."""

    __slots__ = ("attempt", "batch", "ranks", "checkpoint_ops", "failed", "error", "_steps")

    def __init__(
        self,
        *,
        attempt: int,
        steps: StepBatch | Sequence[StepSample],
        ranks: RankStates | Mapping[int, RankState],
        checkpoint_ops: list[CheckpointOp],
        failed: dict[int, str] | None = None,
        error: str | None = None,
    ):
        self.attempt = attempt
        self.batch = steps if isinstance(steps, StepBatch) else StepBatch.from_samples(steps)
        self.ranks = (
            ranks if isinstance(ranks, RankStates) else RankColumns.from_states(attempt, ranks).view()
        )
        self.checkpoint_ops = checkpoint_ops  # new since the previous poll
        self.failed = failed if failed is not None else {}  # rank -> why its scrape failed in this poll
        self.error = error  # the source as a whole failed in this poll (Prometheus unreachable)
        self._steps: list[StepSample] | None = None

    @property
    def steps(self) -> list[StepSample]:
        """The batch as StepSample objects, in reading order (built on first access)."""
        if self._steps is None:
            self._steps = self.batch.samples()
        return self._steps


class TelemetrySource(Protocol):
    attempt: int

    def poll(self, now: float) -> TelemetryUpdate: ...

    def start_attempt(self, attempt: int, *, launched_at: float | None = None) -> None:
        """Read attempt `attempt` from now on (call it before launching it); forgets the ranks' states."""
        ...

    def close(self) -> None: ...


def finite_or_none(value: float | None) -> float | None:
    """The loss as a rank state keeps it: a non-finite value is not a loss to average."""
    return value if value is not None and math.isfinite(value) else None


def own_work_phases(phases: Mapping[str, float]) -> dict[str, float]:
    return {p: phases[p] for p in OWN_WORK_PHASES if p in phases}


class ScrapedRanks:
    """Rank states built from whole-rank snapshots (an endpoint scrape, a Prometheus query)."""

    def __init__(self, num_ranks: int, attempt: int):
        self.attempt = attempt
        self.columns = RankColumns(num_ranks, attempt)

    def states(self) -> RankStates:
        return self.columns.view()

    def observe(
        self, sample: RankSample, now: float, steps: list[StepSample], ops: list[CheckpointOp]
    ) -> None:
        columns = self.columns
        prev = columns.state(sample.rank) if columns.reported[sample.rank] else None
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
        columns.set_state(
            RankState(
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
                loss=finite_or_none(sample.loss),
                text_tokens_total=text,
                vision_tokens_total=vision,
                tokens_per_second=rate,
                checkpoint_seconds=checkpoint,
                storage_outage_seconds=outage,
                storage_wait_at=wait_at,
                updated_at=now,
            )
        )
        if advanced and sample.step_seconds is not None:
            steps.append(
                StepSample(
                    rank=sample.rank,
                    node=sample.node,
                    step=step,
                    own_work_seconds=sample.own_work_seconds,
                    phase_seconds=own_work_phases(phases),
                    wall_seconds=sample.step_seconds,
                    is_checkpoint_step=any(op in SAVING_OPERATIONS for op in changed),
                    attempt=self.attempt,
                )
            )

    def fail(self, rank: int) -> None:
        if self.columns.reported[rank]:
            self.columns.failures[rank] += 1
