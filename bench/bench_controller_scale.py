"""Claims (issue 14, the controller at scale; this benchmark covers the JSONL path so far): at 16,384 ranks each
writing one step line a second, one supervision pass (ingest the new lines, absorb them, the straggler
detector, the hang check, the `rank_status` rows written) costs the controller less than a core; the rows are
written within their budget (controller.store.records.RankRows) instead of every row every pass; the cost grows
linearly with the ranks (the exponent between 4,096 and 16,384 ranks).

For each size (1,024 / 4,096 / 16,384 ranks; `--quick`: 256 / 1,024), a run folder of `metrics-rank{N}.jsonl`
files (8 ranks a node), then TICKS passes: this process appends one trainer-shaped step line per rank (not
timed; 3% lognormal noise on the own work, one rank 1.3x slow from the first step), then times, on this
process's CPU clock,
- ingest: `JsonlTelemetry.poll` (a stat per rank, the new bytes read, each line parsed into the rank's state),
- pass: `LiveAttempt.absorb` (progress, the straggler detector) and `check_hang`,
- rows: the `rank_status` rows in SQLite as the reconciler writes them (`RankRows`: urgent changes at once,
  the rest within RANK_ROWS_PER_SECOND), against the baseline in the same run: every row updated every pass
  through the ORM, as the reconciler did before.
Medians over the passes after the first (the first writes every row). `cpu_at_1hz` = (ingest + pass + rows) / 1 s.
Memory per rank: what the telemetry source and the LiveAttempt hold (tracemalloc), over the ranks. The slow rank
must be flagged (the detector's quality is not traded for speed).

    .venv/bin/python -m bench.bench_controller_scale [--quick] [--ticks N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from sqlalchemy import select

from controller.hangs import HangConfig
from controller.ingest.jsonl import JsonlTelemetry
from controller.store import migrate
from controller.store.models import RankStatus
from controller.store.records import RANK_ROWS_PER_SECOND
from controller.store.repo import create_job
from controller.store.session import StoreConfig, open_store
from controller.stragglers import StragglerConfig
from controller.supervision import LiveAttempt

SIZES = (1024, 4096, 16384)
QUICK_SIZES = (256, 1024)
RANKS_PER_NODE = 8
SLOW_RANK, SLOWDOWN = 5, 1.3
T0 = 1_700_000_000.0


class _Gang:
    def rank_pids(self) -> dict[int, int]:
        return {}


def _line(rank: int, step: int, t: float, rng: random.Random) -> bytes:
    own = 0.9 * rng.lognormvariate(0.0, 0.03) * (SLOWDOWN if rank == SLOW_RANK else 1.0)
    record = {
        "step": step,
        "time": t,
        "attempt": 1,
        "step_seconds": 1.0,
        "own_work_seconds": own,
        "sync_wait_seconds": 1.0 - own,
        "phase_seconds/data": 0.01,
        "phase_seconds/forward": own * 0.35,
        "phase_seconds/backward": own * 0.55,
        "phase_seconds/optimizer": own * 0.09,
        "phase_seconds/collective_wait": 1.0 - own,
        "text_tokens": 4096,
        "vision_tokens": 1024,
        "micro_steps": 4,
        "last_progress_timestamp_seconds": t,
        "loss": 2.0,
        "mfu": 0.4,
        "lr": 1e-4,
        "grad_norm": 1.0,
        "checkpoint_storage_outage_seconds": 0.0,
    }
    return (json.dumps(record) + "\n").encode()


def _every_row_orm(session, job_id: int, live: LiveAttempt, now: float) -> None:
    """The baseline: the reconciler's rank rows before RankRows (every row loaded and updated every pass)."""
    from datetime import UTC, datetime

    rows = {r.rank: r for r in session.scalars(select(RankStatus).where(RankStatus.job_id == job_id))}
    stamp = datetime.fromtimestamp(now, UTC)
    for values in live.rank_rows({}):
        row = rows.get(values["rank"])
        if row is None:
            row = RankStatus(job_id=job_id, rank=values["rank"])
            session.add(row)
        row.attempt, row.node, row.pid, row.step = (
            live.attempt,
            values["node"] or "",
            values["pid"],
            values["step"],
        )
        last = values["last_progress"]
        row.last_progress_at = datetime.fromtimestamp(last, UTC) if last is not None else None
        row.own_work_s, row.step_s, row.loss = values["own_work_s"], values["step_s"], values["loss"]
        row.straggler_score, row.flagged, row.updated_at = values["straggler_score"], values["flagged"], stamp


def measure(ranks: int, ticks: int, root: Path) -> dict[str, Any]:
    run_dir = root / f"run-{ranks}"
    run_dir.mkdir()
    nodes = [f"node-{r // RANKS_PER_NODE}" for r in range(ranks)]
    store = open_store(StoreConfig(url=f"sqlite:///{root / f'store-{ranks}.db'}"))
    migrate.upgrade(store)
    with store.transaction() as session:
        job_id = create_job(session=session, name=f"scale-{ranks}", spec={"name": "scale"}).id
        baseline_id = create_job(session=session, name=f"baseline-{ranks}", spec={"name": "baseline"}).id
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    telemetry = JsonlTelemetry(run_dir, ranks, 1, nodes=nodes)
    live = LiveAttempt(
        job_id=job_id,
        job_name="scale",
        attempt=1,
        num_ranks=ranks,
        dp=ranks,
        gang=_Gang(),
        telemetry=telemetry,
        launched_at=T0,
        stragglers=StragglerConfig(window=5, warmup_steps=5, persistence=2),
        hang=HangConfig(hang_timeout_seconds=600, step_time_factor=10, startup_timeout_seconds=1800),
    )
    files = [open(run_dir / f"metrics-rank{r}.jsonl", "ab", buffering=0) for r in range(ranks)]  # noqa: SIM115
    rng = random.Random(0)
    ingest, passes, rows, baseline, written = [], [], [], [], []
    flagged_at: int | None = None
    try:
        for step in range(ticks):
            now = T0 + step
            for rank, f in enumerate(files):
                f.write(_line(rank, step, now, rng))
            c0 = time.process_time()
            update = telemetry.poll(now)
            c1 = time.process_time()
            newly, _ = live.absorb(update)
            live.check_hang(now)
            c2 = time.process_time()
            with store.transaction() as session:
                written.append(
                    live.rank_store.write(
                        session=session, job_id=job_id, attempt=1, rows=list(live.rank_rows({})), now=now
                    )
                )
            c3 = time.process_time()
            with store.transaction() as session:
                _every_row_orm(session, baseline_id, live, now)
            c4 = time.process_time()
            if flagged_at is None and any(r.rank == SLOW_RANK for r in newly):
                flagged_at = step
            if step == 0:
                held = tracemalloc.get_traced_memory()[0] - before
                tracemalloc.stop()
                continue
            ingest.append(c1 - c0)
            passes.append(c2 - c1)
            rows.append(c3 - c2)
            baseline.append(c4 - c3)
    finally:
        for f in files:
            f.close()
        store.dispose()
    med = {k: statistics.median(v) for k, v in (("ingest", ingest), ("pass", passes), ("rows", rows))}
    return {
        "ranks": ranks,
        "ingest_ms": round(med["ingest"] * 1e3, 1),
        "pass_ms": round(med["pass"] * 1e3, 1),
        "rows_ms": round(med["rows"] * 1e3, 1),
        "rows_written_per_pass": statistics.median(written[1:]),
        "every_row_baseline_ms": round(statistics.median(baseline) * 1e3, 1),
        "rows_ratio": round(med["rows"] / statistics.median(baseline), 3),
        "cpu_at_1hz": round(med["ingest"] + med["pass"] + med["rows"], 3),
        "bytes_per_rank_at_first_pass": round(held / ranks),
        "slow_rank_flagged_at_step": flagged_at,
    }


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_controller_scale")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ticks", type=int, default=None)
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    ticks = args.ticks or 24  # the slow rank: 5 warm-up steps, then 2 windows of 5 in a row
    with tempfile.TemporaryDirectory(prefix="vlctl-bench-scale-") as tmp:
        results = [measure(n, ticks, Path(tmp)) for n in sizes]
    by = {r["ranks"]: r for r in results}
    small, big = sizes[-2], sizes[-1]

    def exponent(key: str) -> float:
        return round(math.log(by[big][key] / by[small][key]) / math.log(big / small), 2)

    top = by[big]
    return {
        "sizes": results,
        "rows_budget_per_second": RANK_ROWS_PER_SECOND,
        "growth_exponent": {k: exponent(k) for k in ("ingest_ms", "pass_ms", "rows_ms")},
        "ratio": top["rows_ratio"],  # rank rows as written now over every row every pass, at the largest size
        "pass_within_100ms": top["pass_ms"] <= 100,
        "cpu_below_one_core": top["cpu_at_1hz"] < 1.0,
        "slow_rank_flagged": all(r["slow_rank_flagged_at_step"] is not None for r in results),
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(main(sys.argv[1:]), indent=1))
