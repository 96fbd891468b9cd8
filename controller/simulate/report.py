"""Runs over seeds, their confidence intervals, the comparison with the analytic model, tables and plots.

Decisions:

- A confidence interval is the mean over seeds +- Student's t (95%, n-1 degrees of freedom) x the standard error:
  seeds are independent runs of the same setting.
- The analytic side of a validation row uses the simulation's own costs: u0 = detection + teardown + the mean of
  the first backoff + launch + load + the first step's extra; w = the blocking save; dt = interval x step time
  (Young/Daly: sqrt(2 w / N r) with the model's true rate).
- Plots use matplotlib's Agg backend, imported here only when a plot is drawn.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.simulate import analytic
from controller.simulate.driver import RunResult, run_once
from controller.simulate.spec import SimSpec

# Student's t at 97.5% for 1..30 degrees of freedom (a 95% two-sided interval); beyond 30, 1.96.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Interval:
    mean: float
    half_width: float  # 95%
    n: int

    def __str__(self) -> str:
        return f"{100 * self.mean:.2f}% +- {100 * self.half_width:.2f}"


def confidence(values: Sequence[float]) -> Interval:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, n)
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return Interval(mean, t * statistics.stdev(values) / math.sqrt(n), n)


@dataclass(frozen=True, slots=True)
class Summary:
    spec: SimSpec
    runs: tuple[RunResult, ...]

    @property
    def ettr_true(self) -> Interval:
        return confidence([r.ettr_true for r in self.runs])

    @property
    def ettr_ledger(self) -> Interval:
        return confidence([r.ettr_ledger for r in self.runs])

    def lost_fraction(self) -> dict[str, float]:
        """The ledger's lost time by cause, as a mean fraction of the wall time."""
        causes = sorted({k for r in self.runs for k in r.lost_seconds})
        return {
            c: statistics.fmean(r.lost_seconds.get(c, 0.0) / r.wall_seconds for r in self.runs)
            for c in causes
        }

    def unaccounted(self) -> float:
        """What the ledger counts productive that did not train (the ledger's ETTR over the truth)."""
        return self.ettr_ledger.mean - self.ettr_true.mean

    def decisions(self) -> dict[str, float]:
        keys = sorted({k for r in self.runs for k in r.decisions})
        return {k: statistics.fmean(r.decisions.get(k, 0) for r in self.runs) for k in keys}

    def failures(self) -> dict[str, float]:
        keys = sorted({k for r in self.runs for k in r.seen_as})
        return {k: statistics.fmean(r.seen_as.get(k, 0) for r in self.runs) for k in keys}

    def intervals(self) -> list[int]:
        return sorted(i for r in self.runs for i in r.intervals_chosen)


def simulate(
    spec: SimSpec,
    *,
    seeds: int | None = None,
    days: float | None = None,
    workdir: Path | None = None,
    progress: Callable[[RunResult], None] | None = None,
) -> Summary:
    runs = []
    for seed in range(seeds or spec.simulation.seeds):
        where = (
            (workdir / f"seed-{seed}") if workdir is not None else Path(tempfile.mkdtemp(prefix="vlctl-sim-"))
        )
        result = run_once(spec, seed=seed, workdir=where, days=days)
        runs.append(result)
        if progress is not None:
            progress(result)
    return Summary(spec, tuple(runs))


# ------------------------------------------------------------------------------------------ the analytic model


@dataclass(frozen=True, slots=True)
class AnalyticRow:
    gpus: int
    interval: str
    rate: float  # N r, per second
    u0: float
    w: float
    dt: float
    analytic: float
    simulated: Interval

    @property
    def difference_pp(self) -> float:
        return 100 * (self.simulated.mean - self.analytic)


def analytic_inputs(spec: SimSpec) -> tuple[float, float, float, float]:
    """(N r, u0, w, dt) for the spec's setting, from its own failure and cost models."""
    model = spec.load_model()
    costs = spec.costs()
    rate = spec.job.nodes * model.rate_per_node_second()
    seen = {c.seen_as for c in model.causes}
    if seen != {"node_lost"}:
        raise ValueError("failure_model: the analytic comparison needs every cause seen as node_lost")
    backoff = spec.policy.backoff_base_seconds * (1 - 0.25 / 2)  # the first backoff's mean (jitter 0.25)
    u0 = costs.restart_fixed_s(detect_s=costs.node_lost_detect_s, backoff_s=backoff)
    w = costs.save_s
    interval = spec.policy.checkpoint_interval
    dt = analytic.young_daly(rate=rate, w=w) if interval == "auto" else interval * spec.job.step_seconds
    return rate, u0, w, dt


def analytic_row(summary: Summary) -> AnalyticRow:
    spec = summary.spec
    rate, u0, w, dt = analytic_inputs(spec)
    return AnalyticRow(
        gpus=spec.gpus,
        interval=str(spec.policy.checkpoint_interval),
        rate=rate,
        u0=u0,
        w=w,
        dt=dt,
        analytic=analytic.ettr(rate=rate, u0=u0, dt=dt, w=w),
        simulated=summary.ettr_true,
    )


def analytic_table(rows: Sequence[AnalyticRow]) -> str:
    lines = [
        "| GPUs | interval | N r (1/h) | u0 (s) | w (s) | dt (s) | analytic ETTR | simulated ETTR (95% CI) | diff (pp) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.gpus:,} | {r.interval} | {3600 * r.rate:.3f} | {r.u0:.1f} | {r.w:.2f} | {r.dt:.0f} | "
            f"{100 * r.analytic:.2f}% | {r.simulated} | {r.difference_pp:+.2f} |"
        )
    return "\n".join(lines)


def summary_table(summaries: Sequence[Summary]) -> str:
    causes = sorted({c for s in summaries for c in s.lost_fraction()} - {"other"})
    head = ["GPUs", "recovery", "interval", "ETTR (truth, 95% CI)", "ETTR (ledger)", *[f"lost: {c}" for c in causes],
            "not in ledger"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for s in summaries:
        lost = s.lost_fraction()
        cells = [f"{s.spec.gpus:,}", s.spec.policy.recovery, str(s.spec.policy.checkpoint_interval), str(s.ettr_true),
                 f"{100 * s.ettr_ledger.mean:.2f}%", *[f"{100 * lost.get(c, 0.0):.2f}%" for c in causes],
                 f"{100 * s.unaccounted():.2f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plots


def plot_ettr_vs_gpus(summaries: Sequence[Summary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for recovery in sorted({s.spec.policy.recovery for s in summaries}):
        mine = sorted((s for s in summaries if s.spec.policy.recovery == recovery), key=lambda s: s.spec.gpus)
        xs = [s.spec.gpus for s in mine]
        ys = [100 * s.ettr_true.mean for s in mine]
        err = [100 * (s.ettr_true.half_width if s.ettr_true.n > 1 else 0.0) for s in mine]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"recovery: {recovery}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("ETTR (%)")
    ax.set_title("ETTR vs job size (Llama 3 failure rates, 95% CI over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lost_breakdown(summaries: Sequence[Summary], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    causes = sorted({c for s in summaries for c in s.lost_fraction()} - {"other"})
    labels = [f"{s.spec.gpus:,} GPUs\n{s.spec.policy.recovery}" for s in summaries]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bottom = [0.0] * len(summaries)
    for cause in [*causes, "not in ledger"]:  # slower steps (snapshots), hang timeouts: see docs/scale.md
        values = [
            100
            * (max(0.0, s.unaccounted()) if cause == "not in ledger" else s.lost_fraction().get(cause, 0.0))
            for s in summaries
        ]
        if not any(values):
            continue
        ax.bar(labels, values, bottom=bottom, label=cause)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("wall time lost (%)")
    ax.set_title("Lost time by cause (the goodput ledger's categories)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
