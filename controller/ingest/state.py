"""Per-rank state: what every telemetry source reports, and how a whole-rank snapshot updates it.

`RankState` is the newest known telemetry of one rank; a source keeps one per rank (fixed fields; its phase and
checkpoint maps hold at most the contract's label values), so nothing grows with the steps. JSONL lines fold
into it in `jsonl`; snapshots (an endpoint scrape, a Prometheus query) through `ScrapedRanks` here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from controller.hangs import RankProgress
from controller.stragglers import StepSample
from trainer.contract.telemetry import CHECKPOINT_OPERATIONS, OWN_WORK_PHASES, PHASES, RankSample

ATTEMPT_KEY = "attempt"  # in JSONL lines and endpoint files (trainer.contract.telemetry.ENV_ATTEMPT)
SAVING_OPERATIONS = ("stage", "save")  # the operations that make a step a checkpoint step


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
            loss=finite_or_none(sample.loss),
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
                    phase_seconds=own_work_phases(phases),
                    wall_seconds=sample.step_seconds,
                    is_checkpoint_step=any(op in SAVING_OPERATIONS for op in changed),
                    attempt=self.attempt,
                )
            )

    def fail(self, rank: int) -> None:
        prev = self.states.get(rank)
        if prev is not None:
            self.states[rank] = replace(prev, failures=prev.failures + 1)
