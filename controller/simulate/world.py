"""The simulated cluster and trainer: where a job is at any simulated time.

- `Timeline`: one stretch of uninterrupted training (from a launch's first step, or from an in-place recovery's
  restore) as closed-form times: step s ends at t0 + extra + (s - s0) x step + w x (checkpoint steps before s),
  so any time's step is a binary search and nothing is simulated step by step.
- `FailureProcess`: Poisson arrivals over the tracked nodes (lemons weigh more), each with a cause drawn in
  proportion to its rate.

Decisions:

- A checkpoint is taken after every step that is a multiple of the interval and blocks training for w (the
  async save's staging); it is committed (on disk, resumable) once that w has passed.
- Failures that arrive while no gang exists (between an attempt's teardown and the next launch) cost nothing:
  the scheduler gives the next launch a healthy machine. They are counted apart.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from controller.hangs import HangConfig
from controller.simulate.backend import (
    CoordinatorServer,
    Round,
    SimClock,
    SimGang,
    remove_checkpoint_dir,
    write_checkpoint_dir,
)
from controller.simulate.costs import Costs
from controller.simulate.failures import SECONDS_PER_DAY, Cause, FailureModel
from controller.simulate.spec import SimSpec


@dataclass(slots=True)
class Timeline:
    t0: float  # when the first step of the stretch starts
    step0: int  # steps done at t0
    step_s: float
    extra_s: float  # the first step's extra time (warm-up)
    interval: int  # checkpoint interval, steps
    save_s: float  # blocking time of a checkpoint

    def _saves_before(self, s: int) -> int:
        """Checkpoint steps in [step0 + 1, s - 1]: their stalls come before step s ends."""
        hi, lo = s - 1, self.step0
        return max(0, hi // self.interval - lo // self.interval)

    def end_of(self, s: int) -> float:
        """When step s (the s-th, counting from 1) completes; s > step0."""
        return self.t0 + self.extra_s + (s - self.step0) * self.step_s + self._saves_before(s) * self.save_s

    def done_at(self, t: float) -> int:
        """Steps done by time t."""
        if t < self.end_of(self.step0 + 1):
            return self.step0
        lo, hi = self.step0 + 1, self.step0 + 2 + int((t - self.t0) / self.step_s)
        while lo < hi:  # the largest s with end_of(s) <= t
            mid = (lo + hi + 1) // 2
            if self.end_of(mid) <= t:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def committed_at(self, t: float) -> int | None:
        """The newest checkpoint step of this stretch whose save is over by t."""
        done = self.done_at(t)
        c = done - done % self.interval
        while c > self.step0:
            if self.end_of(c) + self.save_s <= t:
                return c
            c -= self.interval
        return None

    def checkpoints_between(self, after: int, t: float) -> list[int]:
        """Checkpoint steps > after committed by t."""
        newest = self.committed_at(t)
        if newest is None:
            return []
        first = max(after, self.step0) // self.interval * self.interval + self.interval
        return list(range(first, newest + 1, self.interval))


@dataclass(frozen=True, slots=True)
class Failure:
    at: float
    cause: Cause
    index: int  # which tracked node of the gang


@dataclass(slots=True)
class FailureProcess:
    model: FailureModel
    rng: random.Random
    per_tracked_node_rate: float  # failures per second of one tracked node (a group of physical nodes)
    lemons: dict[str, float] = field(default_factory=dict)  # machine (slot name) -> rate factor
    _cum: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        total = 0.0
        for c in self.model.causes:
            total += c.rate
            self._cum.append(total)

    @classmethod
    def for_job(cls, model: FailureModel, *, group: int, seed: int) -> FailureProcess:
        rate = model.rate_per_node_day * group / SECONDS_PER_DAY
        return cls(model, random.Random(seed), rate)

    def next_after(self, now: float, nodes: list[str]) -> tuple[float, float]:
        """(time, weight) of the next failure among `nodes` after `now`; the weight picks the node later."""
        weight = len(nodes) + sum(self.lemons.get(n, 1.0) - 1.0 for n in nodes if n in self.lemons)
        rate = self.per_tracked_node_rate * weight
        if rate <= 0:
            return math.inf, weight
        return now + self.rng.expovariate(rate), weight

    def draw(self, at: float, nodes: list[str], weight: float) -> Failure:
        cause = self.model.causes[bisect.bisect_left(self._cum, self.rng.random() * self._cum[-1])]
        u = self.rng.random() * weight
        extra = [(n, self.lemons[n] - 1.0) for n in nodes if n in self.lemons]
        index = None
        if u >= len(nodes):
            u -= len(nodes)
            for n, w in extra:
                if u < w:
                    index = nodes.index(n)
                    break
                u -= w
        if index is None:
            index = min(int(u), len(nodes) - 1) if u < len(nodes) else self.rng.randrange(len(nodes))
        return Failure(at, cause, index)

    def after_failure(self, node: str, cause: Cause) -> None:
        """The machine comes back (and may be a lemon from now on), or the slot gets another machine."""
        lemons = self.model.lemons
        if not cause.returns:
            self.lemons.pop(node, None)
        elif node not in self.lemons and lemons.probability > 0 and self.rng.random() < lemons.probability:
            self.lemons[node] = lemons.factor


# ------------------------------------------------------------------------------------------ the world


@dataclass(slots=True)
class WorldStats:
    failures: dict[str, int] = field(default_factory=dict)  # cause -> failures that hit the job
    seen_as: dict[str, int] = field(default_factory=dict)
    idle_failures: int = 0  # arrived between attempts: absorbed by the next launch
    during_startup: int = 0  # hit an attempt before its first step
    spares_started: int = 0


class World:
    """The cluster and the trainer for one job: the gang, its progress, its failures, its checkpoint folder."""

    def __init__(
        self,
        *,
        spec: SimSpec,
        model: FailureModel,
        costs: Costs,
        hang: HangConfig,
        seed: int,
        start: float,
        checkpoint_root: Path,
    ):
        self.spec = spec
        self.costs = costs
        self.hang = hang
        self.clock = SimClock(start)
        self.start = start
        self.failures = FailureProcess.for_job(model, group=spec.group, seed=seed)
        self.coordinator = CoordinatorServer()
        self.gang: SimGang | None = None
        self.checkpoint_root = checkpoint_root
        self.stats = WorldStats()
        self.best_step = 0  # the most steps the job has completed: what it has really trained
        self._next: tuple[float, float] = (math.inf, 0.0)
        self._pending_cause: dict[str, Cause] = {}
        self._forced: set[int] = set()  # checkpoints saved on a graceful stop (planned maintenance)
        self._on_disk: list[int] = []
        self._spares = 0
        self._redraw()

    def close(self) -> None:
        self.coordinator.close()

    # ------------------------------------------------------------------------------ the backend's calls

    def step_seconds(self, gang: SimGang) -> float:
        step = self.spec.job.step_seconds
        return step * (1.0 + self.costs.snapshot_overhead) if gang.in_place else step

    def launch(
        self, *, job_name: str, attempt: int, nodes: list[str], interval: int, resume_step: int,
        hot_spares: int | None,
    ) -> SimGang:  # fmt: skip
        now = self.clock()
        c = self.costs
        in_place = hot_spares is not None
        gang = SimGang(
            world=self,
            job_name=job_name,
            attempt=attempt,
            nodes=list(nodes),
            interval=interval,
            launched_at=now,
            in_place=in_place,
            timeline=Timeline(
                t0=now + c.launch_s + (c.load_s if resume_step else 0.0),
                step0=resume_step,
                step_s=self.spec.job.step_seconds * ((1.0 + c.snapshot_overhead) if in_place else 1.0),
                extra_s=c.first_step_extra_s,
                interval=interval,
                save_s=c.save_s,
            ),
            ops_after=resume_step,
        )
        for _ in range(hot_spares or 0):
            self._new_spare(gang, ready_at=now + c.spare_start_s)
        self.gang = gang
        self.coordinator.gangs[gang.key] = gang
        self._redraw()
        return gang

    def start_spare(self, gang: SimGang) -> str:
        return self._new_spare(gang, ready_at=self.clock() + self.costs.spare_start_s)

    def _new_spare(self, gang: SimGang, *, ready_at: float) -> str:
        name = f"spare-{self._spares}"
        self._spares += 1
        self.stats.spares_started += 1
        gang.spares[name] = ready_at
        return name

    def node_replaced(self, gang: SimGang, node: str) -> None:
        cause = self._pending_cause.pop(node, None)
        if cause is not None:
            self.failures.after_failure(node, cause)
        gang.root = None  # a later failure of this attempt has its own root cause
        self._redraw()

    def resume_in_place(self, gang: SimGang, rnd: Round) -> None:
        """A round opened: the ranks go back to its snapshot step and train again once restored."""
        self.best_step = max(self.best_step, rnd.done)
        gang.timeline = Timeline(
            t0=rnd.resumed_at,
            step0=rnd.step,
            step_s=self.step_seconds(gang),
            extra_s=self.costs.inplace_first_step_extra_s,
            interval=gang.interval,
            save_s=self.costs.save_s,
        )
        gang.stopped_at = None
        gang.hung = None

    def gang_ended(self, gang: SimGang) -> None:
        self.best_step = max(self.best_step, gang.done(self.clock()))
        for node, cause in self._pending_cause.items():
            self.failures.after_failure(node, cause)
        self._pending_cause.clear()
        self._redraw()

    # ------------------------------------------------------------------------------ time passing

    def _active(self) -> SimGang | None:
        g = self.gang
        return g if g is not None and not g.cancelled else None

    def _redraw(self) -> None:
        g = self._active()
        nodes = g.nodes if g is not None else [f"n{i}" for i in range(self.spec.tracked_nodes)]
        self._next = self.failures.next_after(self.clock(), nodes)

    def advance(self, now: float) -> None:
        """Apply every failure that arrives up to `now`."""
        while self._next[0] <= now:
            at, weight = self._next
            g = self._active()
            if g is None:
                self.stats.idle_failures += 1
                self._next = self.failures.next_after(at, [f"n{i}" for i in range(self.spec.tracked_nodes)])
                continue
            f = self.failures.draw(at, g.nodes, weight)
            c = f.cause
            self.stats.failures[c.name] = self.stats.failures.get(c.name, 0) + 1
            self.stats.seen_as[c.seen_as] = self.stats.seen_as.get(c.seen_as, 0) + 1
            if at < g.timeline.end_of(g.timeline.step0 + 1):
                self.stats.during_startup += 1
            detect = self.costs.detect_s(c.seen_as, in_place=g.in_place)
            if c.seen_as == "planned":  # the ranks finish their step and save before the node goes
                done = g.done(at)
                if done > g.timeline.step0:
                    self._forced.add(done)
                detect = self.costs.save_s
            node = g.fail(f.index, c.seen_as, at, detect)
            self._pending_cause.setdefault(node, c)
            self._next = self.failures.next_after(at, g.nodes)

    def materialize(self, now: float) -> None:
        """The checkpoint folder as the trainer would have left it by `now`: the newest committed steps
        (keep_last 2), written as real step folders."""
        g = self.gang
        steps = set(self._on_disk)
        if g is not None:
            newest = g.timeline.committed_at(g.progress_time(now))
            if newest is not None:
                steps.add(newest)
                if newest - g.interval > g.timeline.step0:
                    steps.add(newest - g.interval)
        steps |= {s for s in self._forced if g is None or s <= g.done(now) or g.cancelled}
        keep = sorted(steps)[-2:]
        for s in self._on_disk:
            if s not in keep:
                remove_checkpoint_dir(self.checkpoint_root, s)
        for s in keep:
            write_checkpoint_dir(self.checkpoint_root, s)
        self._on_disk = keep
        if g is not None:
            self.best_step = max(self.best_step, g.done(now))

    def next_event(self, now: float) -> float:
        """The next time something happens that the controller would act on."""
        times = [self._next[0]]
        g = self._active()
        if g is not None:
            tl = g.timeline
            first_end = tl.end_of(tl.step0 + 1)
            if first_end > now and g.stopped_at is None:
                times.append(first_end)
            times += [e.visible_at for e in g.ends.values() if e.visible_at > now]
            times += [t for t in g.spares.values() if t > now]
            for r in g.rounds[-1:]:
                times += [t for t in (r.joined_at, r.resumed_at) if t > now]
            unhandled = any(e.visible_at <= now for n, e in g.ends.items() if n in g.nodes)
            if unhandled:
                times.append(now + 1.0)  # a failed node the controller has not acted on yet: its next poll
            if g.hung is not None and g.stopped_at is not None:
                done = g.done(now)
                if done > tl.step0:
                    limit = max(
                        self.hang.hang_timeout_seconds, self.hang.step_time_factor * self.step_seconds(g)
                    )
                    since = tl.end_of(done)
                else:
                    limit, since = self.hang.startup_timeout_seconds, g.launched_at
                times.append(max(now + 1.0, since + limit + 1.0))
        return min(times)

    def trained_seconds(self) -> float:
        """The healthy compute time of every step the job has completed once (no step counted twice)."""
        return self.best_step * self.spec.job.step_seconds
