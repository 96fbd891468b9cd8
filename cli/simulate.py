"""`vlctl simulate SPEC`: the fleet simulator (controller/simulate/): the real controller through a simulated
cluster, from failure to failure, over seeds.

    vlctl simulate controller/simulate/specs/llama3-16k.yaml --recovery restart,in-place
    vlctl simulate controller/simulate/specs/validation.yaml --validate --gpus 1024,16384,131072 --intervals 50,auto
    vlctl simulate SPEC --plots docs/img --keep /tmp/sim   # PNGs; keep each run's store (`vlctl events` on it)

Decisions:

- The command module imports typer and the CLI's own helpers only; the simulator (SQLAlchemy, numpy, the
  reconciler) and matplotlib load inside the command, so `vlctl --help` pays for none of them.
- Tables are Markdown (they go into docs/scale.md as printed); `--output json` gives every run's numbers.
- A bad spec or failure model is one line naming the field, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import CliError
from .output import OutputFormat, stderr


def _list(text: str | None, convert: Any) -> list[Any]:
    if not text:
        return []
    try:
        return [convert(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise CliError(f"expected a comma-separated list: {text!r} ({err})") from None


def _interval(x: str) -> int | str:
    return "auto" if x == "auto" else int(x)


def simulate(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="simulation spec (YAML)")],
    gpus: Annotated[
        str | None, typer.Option(help="GPU counts to sweep, e.g. 1024,16384 (default: the spec's)")
    ] = None,
    recovery: Annotated[str | None, typer.Option(help="restart, in-place, or both: restart,in-place")] = None,
    intervals: Annotated[
        str | None, typer.Option(help="checkpoint intervals to sweep: steps or auto")
    ] = None,
    seeds: Annotated[int | None, typer.Option(min=1, help="runs per setting (default: the spec's)")] = None,
    days: Annotated[
        float | None, typer.Option(min=0.001, help="simulated days (default: the spec's)")
    ] = None,
    validate: Annotated[bool, typer.Option("--validate", help="compare with the analytic model")] = False,
    plots: Annotated[Path | None, typer.Option(help="write the PNG plots into this folder")] = None,
    keep: Annotated[
        Path | None, typer.Option(help="keep each run's store and run folder under this folder")
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Simulate a job under a failure model with the real controller: ETTR with confidence intervals, lost time
    by cause, the decisions taken."""
    from controller.simulate import report
    from controller.simulate.costs import CostModelError
    from controller.simulate.failures import FailureModelError
    from controller.simulate.spec import SimSpecError, load_sim_spec

    try:
        base = load_sim_spec(spec_file)
        settings = [
            base.with_changes(
                nodes=(g // base.job.gpus_per_node) if g is not None else None, recovery=r, interval=i
            )
            for g in (_list(gpus, int) or [None])
            for r in (_list(recovery, str) or [None])
            for i in (_list(intervals, _interval) or [None])
        ]
        summaries = []
        for spec in settings:
            stderr.print(
                f"simulating {spec.gpus:,} GPUs, recovery {spec.policy.recovery}, interval "
                f"{spec.policy.checkpoint_interval}, {seeds or spec.simulation.seeds} seed(s), "
                f"{days or spec.job.days:g} days",
                markup=False,
            )
            where = (
                keep / f"{spec.gpus}-{spec.policy.recovery}-{spec.policy.checkpoint_interval}"
                if keep
                else None
            )
            summaries.append(
                report.simulate(
                    spec,
                    seeds=seeds,
                    days=days,
                    workdir=where,
                    progress=lambda r: stderr.print(
                        f"  seed {r.seed}: ETTR {100 * r.ettr_true:.2f}% (ledger {100 * r.ettr_ledger:.2f}%), "
                        f"{sum(r.seen_as.values())} failures, {r.passes} passes, {r.run_seconds:.0f} s"
                        + (f", store {r.store_url}" if keep else ""),
                        markup=False,
                    ),
                )
            )
        rows = [report.analytic_row(s) for s in summaries] if validate else []
    except (SimSpecError, FailureModelError, CostModelError) as err:
        raise CliError(str(err)) from None
    if plots is not None:
        report.plot_ettr_vs_gpus(summaries, plots / "sim-ettr-vs-gpus.png")
        report.plot_lost_breakdown(summaries, plots / "sim-lost-by-cause.png")
        stderr.print(f"plots in {plots}", markup=False)
    if output is OutputFormat.json:
        print(json.dumps(_as_json(summaries, rows), indent=1, default=str))
        return
    out = [report.summary_table(summaries)]
    if rows:
        out.append(report.analytic_table(rows))
    out.append(_decisions_table(summaries))
    sys.stdout.write("\n\n".join(out) + "\n")


def _decisions_table(summaries: list[Any]) -> str:
    lines = ["| GPUs | recovery | failures seen as (mean per run) | decisions (mean per run) | intervals chosen |",
             "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for s in summaries:
        seen = ", ".join(f"{k} {v:g}" for k, v in s.failures().items())
        decided = ", ".join(
            f"{k} {v:g}" for k, v in s.decisions().items() if not k.startswith("PhaseChanged/Ranks")
        )
        chosen = s.intervals()
        span = f"{chosen[0]}-{chosen[-1]} steps (median {chosen[len(chosen) // 2]})" if chosen else "-"
        lines.append(f"| {s.spec.gpus:,} | {s.spec.policy.recovery} | {seen} | {decided} | {span} |")
    return "\n".join(lines)


def _as_json(summaries: list[Any], rows: list[Any]) -> dict[str, Any]:
    return {
        "settings": [
            {
                "gpus": s.spec.gpus,
                "recovery": s.spec.policy.recovery,
                "interval": s.spec.policy.checkpoint_interval,
                "ettr": {"mean": s.ettr_true.mean, "ci95": s.ettr_true.half_width},
                "ettr_ledger": {"mean": s.ettr_ledger.mean, "ci95": s.ettr_ledger.half_width},
                "lost_fraction": s.lost_fraction(),
                "runs": [r.__dict__ for r in s.runs],
            }
            for s in summaries
        ],
        "analytic": [
            {
                "gpus": r.gpus,
                "interval": r.interval,
                "rate_per_s": r.rate,
                "u0": r.u0,
                "w": r.w,
                "dt": r.dt,
                "analytic": r.analytic,
                "simulated": r.simulated.mean,
                "ci95": r.simulated.half_width,
                "difference_pp": r.difference_pp,
            }  # fmt: skip
            for r in rows
        ],
    }


def register(app: typer.Typer) -> None:
    app.command()(simulate)
