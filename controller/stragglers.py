"""Straggler detection: which rank is slow, since when, and why (input data or compute).

Decisions:

- The signal is each rank's own work per step (data + forward + backward + optimizer, collectives excluded): in
  synchronous training the collectives make every rank's wall time equal to the slowest rank's
  (see trainer.contract.telemetry).
- Windows are step-aligned and tumbling, and count samples, not steps: a window holds `window` slots of
  `stride` steps each, so it covers window x stride steps; origin = the attempt's first step seen +
  warmup_steps. The stride is the sources' cadence, learned: 1 while every step is seen (JSONL), and when a
  window closes, the median gap between a rank's consecutive samples in it (a Prometheus scrape every 15 s of
  1 s steps: 15). Without it a sparse source gives a rank 1-2 samples in a window of 20 steps, fewer than
  `min_samples`, and no straggler is ever judged (issue 14 measured 0 windows in 600 steps at a 15 s scrape).
  The price is time: at stride 15 a window lasts 300 steps, and the first window of an attempt is spent
  learning the stride. A rank's value for a window is the median of its clean samples there (robust to one-off
  spikes: a GC pause, a slow batch); a rank with fewer than `min_samples` clean samples in a window is not
  evaluated in it. Samples of a window already closed are dropped; a second sample in one slot replaces the
  first.
- Cross-rank score: (x - m) / max(1.4826 * MAD, min_mad_fraction * m). m is the median of the *other* ranks
  (leave-one-out, so that in a job of 2 or 3 ranks the straggler does not drag its own reference up), the MAD is
  over all evaluated ranks; 1.4826 turns it into a standard deviation under normal noise, and the floor keeps a
  quiet cluster (MAD near zero) from flagging 1% differences.
- Own-history ratio: the rank's relative speed against its baseline, the mean relative speed over its first
  `baseline_windows` windows that were not slow by score on its current node. Relative speed is taken step by
  step, then summarised: the window median of own[r, s] / (median of the other ranks at step s). Relative speed
  cancels job-wide changes (data mix, sequence length), and taking it per step cancels them where they last only
  part of a window. The ratio of window medians does not: when such a slowdown covers about half a window, one
  rank's median lands among the slowed steps and another's among the normal ones (a 1.3x rank read as 1.02x
  for a window on a 2-core machine, which broke its persistence count). A baseline that stays put, unlike an EWMA that would follow a slow drift, catches a
  1%-per-window degradation that hides inside the spread of a heterogeneous job. It restarts when the rank moves
  to another node, and survives attempts otherwise.
- A window is slow for a rank when score >= threshold or ratio >= ratio_threshold, the ratio only while the
  rank is not faster than its reference by more than that same threshold (own work x ratio_threshold >= the
  reference: a rank well ahead of the others holds nobody up, and in a 2-rank job a baseline learned while the
  other rank was slow would otherwise flag the fast one); `persistence` consecutive slow windows flag it, and it is reported every window until a window is not slow. A window in which the rank is not
  evaluated leaves its count as it was.
- Never judged: the first warmup_steps steps of each attempt, checkpoint steps, steps marked after_restart. A new
  attempt (a higher `attempt` in the input) clears the windows and counts.
- Node: when more than `node_fraction` of a node's evaluated ranks are flagged together, the node is reported
  (a throttled board, a bad link, a noisy neighbour) and its ranks are marked node_wide.
- Phase: the phase whose window median grew most in seconds, against the median rank when the score flagged
  the rank, against the rank's own baseline split when only the ratio did; `data` means cause "data" (input
  pipeline, storage), every other phase "compute".
- Scale (16,384 ranks): state is O(num_ranks x window) numpy arrays allocated once; ingest and scoring are
  vectorised over ranks. Python loops run over the distinct steps and nodes of a batch and the flagged ranks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from trainer.contract.telemetry import OWN_WORK_PHASES

LEVEL_MIN_SAMPLES = 5  # samples of one step that set its job-wide level (sparse sources)
LEVEL_STEPS = 64  # recent step levels whose median is the common level
MAX_STRIDE = 3600  # steps per slot at most: one sample an hour of 1 s steps
MAD_TO_SIGMA = 1.4826  # MAD x this = standard deviation for normally distributed values
DATA_PHASE = "data"
CAUSE_DATA = "data"
CAUSE_COMPUTE = "compute"


@dataclass(kw_only=True, slots=True)
class StragglerConfig:
    window: int = 20  # steps per evaluation window
    threshold: float = 5.0  # robust z-score at which a rank's window is slow
    ratio_threshold: float = 1.2  # relative speed over the rank's own baseline at which a window is slow
    persistence: int = 3  # consecutive slow windows before a rank is flagged
    warmup_steps: int = 20  # steps of each attempt never judged (compilation, caches, checkpoint load)
    min_mad_fraction: float = 0.02  # floor of 1.4826 x MAD, as a fraction of the reference own-work time
    min_samples: int = 5  # clean samples a rank needs in a window to be evaluated
    baseline_windows: int = 3  # windows that set a rank's own baseline
    node_fraction: float = 0.5  # a node is the straggler when more than this share of its ranks is flagged

    def __post_init__(self) -> None:
        for name in ("window", "persistence", "min_samples", "baseline_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.min_samples > self.window:
            raise ValueError(f"min_samples: must be <= window ({self.window}), got {self.min_samples}")
        if not self.threshold > 0:
            raise ValueError(f"threshold: must be > 0, got {self.threshold}")
        if not self.ratio_threshold > 1:
            raise ValueError(f"ratio_threshold: must be > 1, got {self.ratio_threshold}")
        if not self.min_mad_fraction > 0:
            raise ValueError(f"min_mad_fraction: must be > 0, got {self.min_mad_fraction}")
        if not 0 <= self.node_fraction < 1:
            raise ValueError(f"node_fraction: must be in [0, 1), got {self.node_fraction}")


@dataclass(kw_only=True, slots=True, frozen=True)
class StepSample:
    """One rank's telemetry for one step, as scraped or read from its JSONL line."""

    rank: int
    node: str
    step: int
    own_work_seconds: float | None
    phase_seconds: dict[str, float] = field(default_factory=dict)  # keys from OWN_WORK_PHASES
    wall_seconds: float | None = None  # not scored: equal on every rank of a synchronous job
    is_checkpoint_step: bool = False
    attempt: int = 0
    after_restart: bool = False


@dataclass(kw_only=True, slots=True)
class StepBatch:
    """Samples in columns, the detector's input; NaN where a rank did not report a value."""

    rank: np.ndarray  # (n,) int
    node: np.ndarray  # (n,) str
    step: np.ndarray  # (n,) int
    own_work_seconds: np.ndarray  # (n,) float
    phase_seconds: np.ndarray  # (n, len(OWN_WORK_PHASES)) float
    is_checkpoint_step: np.ndarray  # (n,) bool
    after_restart: np.ndarray  # (n,) bool
    attempt: np.ndarray  # (n,) int
    wall_seconds: np.ndarray | None = None  # (n,) float; not scored (None: NaN for every sample)

    def __post_init__(self) -> None:
        self.rank = np.asarray(self.rank, dtype=np.int64).reshape(-1)
        n = self.rank.size
        self.node = np.asarray(self.node, dtype=str).reshape(-1)
        self.step = np.asarray(self.step, dtype=np.int64).reshape(-1)
        self.own_work_seconds = np.asarray(self.own_work_seconds, dtype=np.float64).reshape(-1)
        phases = np.asarray(self.phase_seconds, dtype=np.float64)
        # An empty batch may come as [] (no columns to infer): it has the contract's.
        self.phase_seconds = phases.reshape(n, -1) if phases.size else phases.reshape(n, len(OWN_WORK_PHASES))
        self.is_checkpoint_step = np.asarray(self.is_checkpoint_step, dtype=bool).reshape(-1)
        self.after_restart = np.asarray(self.after_restart, dtype=bool).reshape(-1)
        self.attempt = np.asarray(self.attempt, dtype=np.int64).reshape(-1)
        self.wall_seconds = (
            np.full(n, math.nan)
            if self.wall_seconds is None
            else np.asarray(self.wall_seconds, dtype=np.float64).reshape(-1)
        )
        for name in (
            "node",
            "step",
            "own_work_seconds",
            "is_checkpoint_step",
            "after_restart",
            "attempt",
            "wall_seconds",
        ):
            if getattr(self, name).size != n:
                raise ValueError(
                    f"{name}: expected {n} values (one per rank), got {getattr(self, name).size}"
                )
        if self.phase_seconds.shape[1] != len(OWN_WORK_PHASES):
            raise ValueError(
                f"phase_seconds: expected {len(OWN_WORK_PHASES)} columns ({', '.join(OWN_WORK_PHASES)})"
            )
        if n and (self.rank.min() < 0 or self.step.min() < 0):
            raise ValueError("rank, step: must be >= 0")

    def __len__(self) -> int:
        return int(self.rank.size)

    @classmethod
    def from_samples(cls, samples: Iterable[StepSample]) -> StepBatch:
        s = list(samples)
        nan = math.nan
        return cls(
            rank=[x.rank for x in s],
            node=[x.node for x in s],
            step=[x.step for x in s],
            own_work_seconds=[nan if x.own_work_seconds is None else x.own_work_seconds for x in s],
            # fromiter over a flat generator: np.array of a small list per sample grew faster than the ranks
            phase_seconds=np.fromiter(
                (x.phase_seconds.get(p, nan) for x in s for p in OWN_WORK_PHASES),
                dtype=np.float64,
                count=len(s) * len(OWN_WORK_PHASES),
            ).reshape(len(s), len(OWN_WORK_PHASES)),
            is_checkpoint_step=[x.is_checkpoint_step for x in s],
            after_restart=[x.after_restart for x in s],
            attempt=[x.attempt for x in s],
            wall_seconds=[nan if x.wall_seconds is None else x.wall_seconds for x in s],
        )

    def samples(self) -> list[StepSample]:
        """The batch as StepSample objects (the inverse of `from_samples`; NaN reads as not reported)."""

        def value(x: float) -> float | None:
            return None if x != x else x

        phases = self.phase_seconds.tolist()
        return [
            StepSample(
                rank=rank,
                node=node,
                step=step,
                own_work_seconds=value(own),
                phase_seconds={p: v for p, v in zip(OWN_WORK_PHASES, phases[i], strict=True) if v == v},
                wall_seconds=value(wall),
                is_checkpoint_step=checkpoint,
                attempt=attempt,
                after_restart=after,
            )
            for i, (rank, node, step, own, wall, checkpoint, attempt, after) in enumerate(
                zip(
                    self.rank.tolist(),
                    self.node.tolist(),
                    self.step.tolist(),
                    self.own_work_seconds.tolist(),
                    self.wall_seconds.tolist(),
                    self.is_checkpoint_step.tolist(),
                    self.attempt.tolist(),
                    self.after_restart.tolist(),
                    strict=True,
                )
            )
        ]

    @classmethod
    def for_step(
        cls,
        step: int,
        *,
        own_work_seconds: np.ndarray,
        phase_seconds: np.ndarray,
        nodes: Sequence[str] | np.ndarray,
        attempt: int = 0,
        is_checkpoint_step: bool = False,
        after_restart: bool = False,
    ) -> StepBatch:
        """All ranks 0..n-1 at one step (the shape the JSONL tailer and a full scrape produce)."""
        n = len(own_work_seconds)
        return cls(
            rank=np.arange(n),
            node=nodes,
            step=np.full(n, step),
            own_work_seconds=own_work_seconds,
            phase_seconds=phase_seconds,
            is_checkpoint_step=np.full(n, is_checkpoint_step),
            after_restart=np.full(n, after_restart),
            attempt=np.full(n, attempt),
        )


@dataclass(frozen=True, slots=True)
class StragglerReport:
    rank: int
    node: str
    step: int  # last step of the window
    own_work_seconds: float  # the rank's window median
    reference_seconds: float  # median of the other ranks
    score: float
    ratio: float | None  # relative speed over the own baseline; None until the baseline is set
    phase: str | None  # None when no phase times were reported
    cause: str | None  # "data" or "compute"
    windows: int  # consecutive slow windows so far
    node_wide: bool  # the whole node is slow (see NodeReport)

    @property
    def slowdown(self) -> float:
        return self.own_work_seconds / self.reference_seconds


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    ranks: tuple[int, ...]  # its flagged ranks
    num_ranks: int  # its ranks evaluated in the window
    slowdown: float  # median over its flagged ranks
    phase: str | None  # the most common among its flagged ranks
    cause: str | None


@dataclass(frozen=True, slots=True)
class WindowResult:
    first_step: int
    last_step: int
    num_ranks: int  # ranks evaluated
    median_seconds: float  # median own work across evaluated ranks
    mad_seconds: float
    stragglers: tuple[StragglerReport, ...]
    nodes: tuple[NodeReport, ...]
    # Every evaluated rank's values in the window, for the record the dashboard's heatmap reads (arrays in the
    # same order): rank, node name, own work's median, mean and 90th percentile, clean samples, score.
    ranks: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rank_nodes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=str))
    own_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    own_mean_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    own_p90_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))


class StragglerDetector:
    """Feed it batches of step samples in any grouping; it returns a WindowResult for every window closed."""

    def __init__(self, config: StragglerConfig, *, num_ranks: int):
        if num_ranks < 1:
            raise ValueError(f"num_ranks: must be >= 1, got {num_ranks}")
        self.config = config
        self.num_ranks = num_ranks
        r, w, p = num_ranks, config.window, len(OWN_WORK_PHASES)
        # The open window, slot = (step - window start) // stride. Single precision: seconds to 7 digits are
        # plenty for a median, and at 16,384 ranks x 20 slots x 5 columns it halves the detector's memory.
        self._own = np.full((r, w), np.nan, dtype=np.float32)
        self._phases = np.full((r, p, w), np.nan, dtype=np.float32)
        self._node = np.full(r, -1, dtype=np.int64)  # index into _node_names; -1 unknown
        self._node_names: list[str] = []
        self._node_index: dict[str, int] = {}
        self._known_names = np.array([], dtype=str)  # sorted, for a vectorised name -> code lookup
        self._known_codes = np.array([], dtype=np.int64)
        self._baseline = np.full(r, np.nan)  # relative speed (step-aligned, see the module's docstring)
        self._baseline_phases = np.full((r, p), np.nan)  # phase seconds / reference own work
        self._baseline_count = np.zeros(r, dtype=np.int64)
        self._consecutive = np.zeros(r, dtype=np.int64)
        self._scores = np.full(r, np.nan)
        self._attempt: int | None = None
        self._window_start = 0
        self.stride = 1  # steps per slot of the open window (see the module's docstring)
        self._levels: deque[float] = deque(maxlen=LEVEL_STEPS)  # recent steps' median own work (stride > 1)
        self._last_step = np.full(r, -1, dtype=np.int64)  # each rank's newest sample's step, for the gaps
        self._gaps = np.zeros(MAX_STRIDE + 1, dtype=np.int64)  # histogram of the open window's sample gaps

    @property
    def state_nbytes(self) -> int:
        arrays = (self._own, self._phases, self._node, self._baseline, self._baseline_phases, self._last_step)
        return sum(a.nbytes for a in arrays) + sum(
            a.nbytes for a in (self._baseline_count, self._consecutive, self._scores)
        )

    @property
    def scores(self) -> np.ndarray:
        """Each rank's score in the last closed window (NaN where not evaluated), for status displays."""
        return self._scores.copy()

    @property
    def flagged_ranks(self) -> np.ndarray:
        return np.flatnonzero(self._consecutive >= self.config.persistence)

    def observe_samples(self, samples: Iterable[StepSample]) -> list[WindowResult]:
        return self.observe(StepBatch.from_samples(samples))

    def observe(self, batch: StepBatch) -> list[WindowResult]:
        if not len(batch):
            return []
        if batch.rank.max() >= self.num_ranks:
            raise ValueError(f"rank: {int(batch.rank.max())} is outside the job's {self.num_ranks} ranks")
        newest = int(batch.attempt.max())
        if self._attempt is None or newest > self._attempt:
            self._start_attempt(newest, first_step=int(batch.step[batch.attempt == newest].min()))
        current = batch.attempt == self._attempt  # older attempts: late scrapes of processes already gone
        self._update_nodes(batch.rank[current], batch.node[current])
        keep = (
            current
            & ~batch.is_checkpoint_step
            & ~batch.after_restart
            & np.isfinite(batch.own_work_seconds)
            & (batch.step >= self._window_start)
        )
        self._count_gaps(batch.rank[current], batch.step[current])
        rank, step = batch.rank[keep], batch.step[keep]
        own, phases = batch.own_work_seconds[keep], batch.phase_seconds[keep]
        if self.stride > 1:
            own, phases = self._level_steps(step, own, phases)
        results = []
        while rank.size:  # usually one pass, two at a window boundary
            length = self.config.window * self.stride
            index = (step - self._window_start) // length  # windows after the open one (0)
            later = int(index.min())
            if later > 0:  # the open window is over: close it, and the empty ones after it with it
                if (result := self._close_window()) is not None:
                    results.append(result)
                self._window_start += later * length
                self.stride = self._next_stride()
                continue
            sel = index == 0
            slot = (step[sel] - self._window_start) // self.stride
            self._own[rank[sel], slot] = own[sel]
            self._phases[rank[sel], :, slot] = phases[sel]
            rest = ~sel
            rank, step, own, phases = rank[rest], step[rest], own[rest], phases[rest]
        return results

    def _level_steps(
        self, step: np.ndarray, own: np.ndarray, phases: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Sparse samples (one rank seen at step 3, another at step 9 of the same slot) to a common level: each
        sample times the recent steps' median level over its own step's median, where its step has
        LEVEL_MIN_SAMPLES samples or more. A job-wide change from step to step (the data mix, the sequence
        lengths) would otherwise read as a difference between ranks seen at different steps (at every step
        they all share it, and the slot's leave-one-out reference takes it out)."""
        values, inverse, counts = np.unique(step, return_inverse=True, return_counts=True)
        level = np.full(values.size, np.nan)
        for k in np.flatnonzero(counts >= LEVEL_MIN_SAMPLES):  # the distinct steps of a poll: tens at most
            level[k] = np.median(own[inverse == k])
            self._levels.append(level[k])
        if not self._levels:
            return own, phases
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = np.median(self._levels) / level[inverse]
        factor = np.where(np.isfinite(factor), factor, 1.0)
        return own * factor, phases * factor[:, None]

    def _count_gaps(self, rank: np.ndarray, step: np.ndarray) -> None:
        """Add the steps between each rank's consecutive samples to the open window's histogram."""
        order = np.lexsort((step, rank))  # a batch may hold several steps of one rank (a JSONL poll)
        rank, step = rank[order], step[order]
        previous = self._last_step[rank]
        same = np.zeros(rank.size, dtype=bool)
        same[1:] = rank[1:] == rank[:-1]
        previous[1:] = np.where(same[1:], step[:-1], previous[1:])
        gap = step - previous
        gap = gap[(previous >= 0) & (gap > 0)]
        self._gaps += np.bincount(np.minimum(gap, MAX_STRIDE), minlength=MAX_STRIDE + 1)
        self._last_step[rank] = step  # the last write per rank wins: its newest step (sorted)

    def _next_stride(self) -> int:
        """The median gap between samples in the window just closed (1 while every step was seen); the stride
        stays as it was when the window saw no gap."""
        gaps, self._gaps = self._gaps, np.zeros_like(self._gaps)
        total = int(gaps.sum())
        if not total:
            return self.stride
        return max(1, int(np.searchsorted(np.cumsum(gaps), (total + 1) // 2)))

    def _start_attempt(self, attempt: int, *, first_step: int) -> None:
        self._attempt = attempt
        self._window_start = first_step + self.config.warmup_steps
        self._last_step.fill(-1)  # the cadence carries over (same sources); the gaps start again
        self._gaps.fill(0)
        self._own.fill(np.nan)
        self._phases.fill(np.nan)
        self._consecutive.fill(0)
        self._scores.fill(np.nan)

    def _update_nodes(self, rank: np.ndarray, node: np.ndarray) -> None:
        names, inverse = np.unique(node, return_inverse=True)
        pos = np.minimum(np.searchsorted(self._known_names, names), max(self._known_names.size - 1, 0))
        found = (
            self._known_names[pos] == names if self._known_names.size else np.zeros(names.size, dtype=bool)
        )
        if not found.all():  # a Python loop over node names seen for the first time only
            for name in names[~found]:
                self._node_index[str(name)] = len(self._node_names)
                self._node_names.append(str(name))
            self._known_names = np.array(sorted(self._node_index), dtype=str)
            self._known_codes = np.array([self._node_index[n] for n in self._known_names], dtype=np.int64)
            pos = np.searchsorted(self._known_names, names)
        code = self._known_codes[pos][inverse]
        moved = rank[self._node[rank] != code]
        if moved.size:  # a new node is new hardware: learn the baseline again
            self._baseline[moved] = np.nan
            self._baseline_phases[moved] = np.nan
            self._baseline_count[moved] = 0
            self._node[rank] = code

    def _close_window(self) -> WindowResult | None:
        cfg = self.config
        x_all, counts = row_medians(self._own)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_all = row_medians(self._own / column_leave_one_out_medians(self._own))[0]
        ranks = np.flatnonzero(counts >= cfg.min_samples)
        phase_med = row_medians(self._phases[ranks])[0]  # (n, P)
        # The evaluated ranks' mean and 90th percentile (nearest rank) of the window, for its record.
        ordered = np.sort(self._own[ranks], axis=1).astype(np.float64)  # NaN last
        n_ok = counts[ranks]
        own_mean = np.nansum(ordered, axis=1) / np.maximum(n_ok, 1)
        p90_at = np.maximum(np.ceil(0.9 * n_ok).astype(np.int64) - 1, 0)[:, None]
        own_p90 = np.take_along_axis(ordered, p90_at, axis=1)[:, 0]
        first_step, last_step = self._window_start, self._window_start + cfg.window * self.stride - 1
        self._own.fill(np.nan)
        self._phases.fill(np.nan)
        self._scores.fill(np.nan)
        if ranks.size < 2:
            return None
        x = x_all[ranks]
        ref, median, mad, score = robust_scores(x, cfg.min_mad_fraction)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = rel_all[ranks]  # relative speed, step-aligned
            established = self._baseline_count[ranks] >= cfg.baseline_windows
            ratio = np.where(established, rel / self._baseline[ranks], np.nan)
            phase_frac = phase_med / ref[:, None]  # phase seconds as a fraction of the reference own work
        self._scores[ranks] = score
        learn = ~established & (score < cfg.threshold)  # a rank slow from the start must not learn slowness
        self._learn_baselines(ranks[learn], rel[learn], phase_frac[learn])

        # The ratio alone never flags a rank faster than its reference by the ratio's own threshold: it holds
        # nobody up, and its "slowdown" is a baseline learned while its reference was slow (a 2-rank job under
        # load flagged its faster rank, at 0.64x the other, "1.40x its own baseline").
        slow = (score >= cfg.threshold) | ((ratio >= cfg.ratio_threshold) & (x * cfg.ratio_threshold >= ref))
        self._consecutive[ranks] = np.where(slow, self._consecutive[ranks] + 1, 0)
        flagged = self._consecutive[ranks] >= cfg.persistence
        code = self._node[ranks]
        node_total, node_slow = slow_nodes(code, flagged, len(self._node_names), cfg.node_fraction)
        node_wide = flagged & node_slow[code + 1]

        # Phase: excess seconds over the median rank (score) or over the rank's own split (ratio alone).
        f = np.flatnonzero(flagged)
        cross = phase_med[f] - row_medians(phase_med.T)[0][None, :]
        own = (phase_frac[f] - self._baseline_phases[ranks[f]]) * ref[f, None]
        phases = top_phases(np.where((score[f] >= cfg.threshold)[:, None], cross, own))

        reports = tuple(
            StragglerReport(
                rank=int(ranks[k]),
                node=self._node_name(int(code[k])),
                step=last_step,
                own_work_seconds=float(x[k]),
                reference_seconds=float(ref[k]),
                score=float(score[k]),
                ratio=None if math.isnan(ratio[k]) else float(ratio[k]),
                phase=phase,
                cause=phase_cause(phase),
                windows=int(self._consecutive[ranks[k]]),
                node_wide=bool(node_wide[k]),
            )
            for k, phase in zip(f, phases, strict=True)  # flagged ranks only
        )
        nodes = tuple(
            summarize_node(self._node_names[c - 1], int(node_total[c]), reports)
            for c in np.flatnonzero(node_slow)
        )
        names = np.array(["", *self._node_names], dtype=str)  # code -1: "" (a rank whose node is unknown)
        return WindowResult(
            first_step=first_step,
            last_step=last_step,
            num_ranks=int(ranks.size),
            median_seconds=median,
            mad_seconds=mad,
            stragglers=reports,
            nodes=nodes,
            ranks=ranks,
            rank_nodes=names[code + 1],
            own_seconds=x.astype(np.float64),
            own_mean_seconds=own_mean,
            own_p90_seconds=own_p90,
            samples=n_ok,
            scores=np.asarray(score, dtype=np.float64),
        )

    def _learn_baselines(self, ranks: np.ndarray, rel: np.ndarray, phase_frac: np.ndarray) -> None:
        """Add one window to the baselines of `ranks` (rel and phase_frac are already selected for them)."""
        n_seen = self._baseline_count[ranks]
        self._baseline[ranks] = running_mean(self._baseline[ranks], rel, n_seen)
        self._baseline_phases[ranks] = running_mean(self._baseline_phases[ranks], phase_frac, n_seen[:, None])
        self._baseline_count[ranks] += 1

    def _node_name(self, code: int) -> str:
        return self._node_names[code] if code >= 0 else ""


def robust_scores(x: np.ndarray, min_mad_fraction: float) -> tuple[np.ndarray, float, float, np.ndarray]:
    """Leave-one-out references, the median, the MAD and each value's score (NaN where undefined)."""
    ref = leave_one_out_medians(x)
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = (x - ref) / np.maximum(MAD_TO_SIGMA * mad, min_mad_fraction * ref)
    return ref, median, mad, np.where(np.isfinite(score), score, np.nan)


def slow_nodes(
    code: np.ndarray, flagged: np.ndarray, num_nodes: int, node_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per node code + 1 (bin 0: unknown node): evaluated ranks, and whether more than node_fraction of them
    are flagged."""
    total = np.bincount(code + 1, minlength=num_nodes + 1)
    hit = np.bincount(code + 1, weights=flagged, minlength=num_nodes + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slow = (hit > 0) & (hit / total > node_fraction)
    slow[0] = False
    return total, slow


def top_phases(excess: np.ndarray) -> list[str | None]:
    """Per row, the phase with the largest excess; None where no phase was reported."""
    known = ~np.all(np.isnan(excess), axis=1)
    top = np.argmax(np.where(np.isnan(excess), -np.inf, excess), axis=1)
    return [OWN_WORK_PHASES[t] if k else None for t, k in zip(top, known, strict=True)]


def summarize_node(node: str, num_ranks: int, reports: Sequence[StragglerReport]) -> NodeReport:
    mine = [r for r in reports if r.node == node]
    phases = [r.phase for r in mine if r.phase is not None]
    phase = min(set(phases), key=lambda p: (-phases.count(p), OWN_WORK_PHASES.index(p))) if phases else None
    return NodeReport(
        node=node,
        ranks=tuple(r.rank for r in mine),
        num_ranks=num_ranks,
        slowdown=float(np.median([r.slowdown for r in mine])),
        phase=phase,
        cause=phase_cause(phase),
    )


def phase_cause(phase: str | None) -> str | None:
    if phase is None:
        return None
    return CAUSE_DATA if phase == DATA_PHASE else CAUSE_COMPUTE


def row_medians(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and count of the non-NaN values along the last axis (NaN where there are none).
    Sorting puts NaN last, so the median sits at the middle of each row's valid prefix."""
    counts = np.count_nonzero(~np.isnan(values), axis=-1)
    ordered = np.sort(values, axis=-1)
    lo = np.maximum((counts - 1) // 2, 0)[..., None]
    hi = np.maximum(counts // 2, 0)[..., None]
    mid = (np.take_along_axis(ordered, lo, -1) + np.take_along_axis(ordered, hi, -1))[..., 0] / 2
    return np.where(counts > 0, mid, np.nan), counts


def leave_one_out_medians(x: np.ndarray) -> np.ndarray:
    """For each element of the 1-D `x` (>= 2 values, no NaN), the median of all the others."""
    return column_leave_one_out_medians(np.asarray(x, dtype=np.float64)[:, None])[:, 0]


def column_leave_one_out_medians(values: np.ndarray) -> np.ndarray:
    """For each element of the 2-D `values`, the median of the other non-NaN values in its column (NaN where the
    element is NaN or it is its column's only value). Removing the value at sorted position p from a column of n
    leaves n - 1 sorted values t with t[k] = s[k] for k < p and s[k + 1] otherwise, whose median is read at two
    positions: no sorting per element, one sort per column."""
    counts = np.count_nonzero(~np.isnan(values), axis=0)  # (W,)
    order = np.argsort(values, axis=0, kind="stable")  # NaN last
    ordered = np.take_along_axis(values, order, 0)
    pos = np.arange(values.shape[0])[:, None]  # each element's sorted position
    m = counts - 1  # values left in its column
    lo, hi = np.maximum((m - 1) // 2, 0)[None, :], np.maximum(m // 2, 0)[None, :]

    def others(k: np.ndarray) -> np.ndarray:  # t[k] for the element at each sorted position
        index = np.minimum(np.where(k < pos, k, k + 1), values.shape[0] - 1)
        return np.take_along_axis(ordered, np.broadcast_to(index, values.shape), 0)

    medians_sorted = (others(lo) + others(hi)) / 2
    medians_sorted = np.where((pos < counts[None, :]) & (m[None, :] >= 1), medians_sorted, np.nan)
    out = np.empty_like(medians_sorted)
    np.put_along_axis(out, order, medians_sorted, 0)
    return out


def running_mean(mean: np.ndarray, value: np.ndarray, n_seen: np.ndarray) -> np.ndarray:
    """Mean after adding `value` to `n_seen` earlier values; a NaN on either side leaves the other."""
    with np.errstate(invalid="ignore"):
        updated = (mean * n_seen + value) / (n_seen + 1)
    return np.where(np.isnan(mean), value, np.where(np.isnan(value), mean, updated))
