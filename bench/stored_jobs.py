"""Stored jobs for the dashboard's tests and its benchmark (bench_dashboard): a job whose strings try to inject
markup, and a 16,384-rank job, written straight into a store the way the controller would have left them (no
training runs)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import insert, update

from controller.store.models import Job
from controller.store.records import RankWindowStats, record_rank_windows
from controller.store.repo import append_event, create_job, record_attempt_started
from controller.store.session import Store
from controller.store.tables import jobs, rank_status, utcnow
from trainer.contract.telemetry import JSONL_FILE

SCRIPT = "<script>window.__injected = 1</script><img src=x onerror=window.__injected=2>"


def _spec(name: str, nodes: int, procs: int) -> dict:
    return {
        "name": name,
        "resources": {"nodes": nodes, "procs_per_node": procs},
        "training": {"training": {"steps": 1000}, "parallel": {"dp": nodes * procs}},
    }


def write_rank0_steps(run_dir: Path, steps: range, *, attempt: int = 1) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / JSONL_FILE.format(rank=0)).open("a") as f:
        for s in steps:
            line = {
                "step": s,
                "time": 1.7e9 + s,
                "attempt": attempt,
                "step_seconds": 0.5,
                "loss": 3.0 / (1 + s),
            }
            f.write(json.dumps({**line, "text_tokens": 512, "vision_tokens": 128, "mfu": 0.4}) + "\n")


def store_hostile_job(store: Store, run_dir: Path, name: str = "hostile") -> None:
    """A small job whose message, event and node name carry markup: the page must show them as text."""
    with store.transaction() as session:
        job = create_job(session=session, name=name, spec=_spec(name, 2, 1))
        record_attempt_started(session=session, job=job, nodes=[SCRIPT, "local-1"], launched_by="test")
        append_event(session=session, job=job, type="Failure", reason="Crash", message=SCRIPT, attempt=1)
        append_event(session=session, job=job, type="Straggler", reason="StragglerFlagged", message="rank 1 is slow",
                     attempt=1, data={"rank": 1, "cause": "compute", "phase": "backward", "slowdown": 1.4, "step": 9})  # fmt: skip
        session.flush()
        session.execute(
            update(jobs)
            .where(jobs.c.id == job.id)
            .values(
                phase="running", phase_message=SCRIPT, run_dir=str(run_dir), current_step=10, total_steps=1000
            )
        )
        session.execute(
            insert(rank_status),
            [
                {
                    "job_id": job.id,
                    "attempt": 1,
                    "rank": r,
                    "node": SCRIPT if r == 0 else "local-1",
                    "step": 9,
                    "own_work_s": 0.4,
                    "step_s": 0.5,
                    "flagged": r == 1,
                    "straggler_score": 7.0 if r else 0.1,
                    "updated_at": utcnow(),
                }
                for r in range(2)
            ],  # fmt: skip
        )
    write_rank0_steps(run_dir, range(10))


def store_large_job(
    store: Store, run_dir: Path, *, ranks: int = 16_384, name: str = "large", windows: int = 4
) -> int:
    """A running job of `ranks` ranks (8 a node) with its rank rows, `windows` straggler windows per rank (one
    node slow and flagged), events, and rank 0's steps; returns its id."""
    slow_node = (ranks // 8) // 2
    with store.transaction() as session:
        job = create_job(session=session, name=name, spec=_spec(name, ranks // 8, 8))
        nodes = [f"node-{n}" for n in range(ranks // 8)]
        record_attempt_started(session=session, job=job, nodes=nodes, launched_by="test")
        for k in range(20):
            append_event(
                session=session, job=job, type="Decision", reason="CheckpointInterval", message=f"event {k}"
            )
        session.flush()
        job_id = job.id
        now = utcnow()
        session.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                phase="running", run_dir=str(run_dir), current_step=100, total_steps=1000, progress_at=now
            )
        )
        session.execute(
            insert(rank_status),
            [
                {
                    "job_id": job_id,
                    "attempt": 1,
                    "rank": r,
                    "node": f"node-{r // 8}",
                    "step": 99,
                    "pid": 10_000 + r,
                    "own_work_s": 1.3 if r // 8 == slow_node else 0.9,
                    "step_s": 1.31,
                    "loss": 2.0,
                    "flagged": r // 8 == slow_node,
                    "straggler_score": 9.0 if r // 8 == slow_node else 0.2,
                    "last_progress_at": now - timedelta(seconds=1),
                    "updated_at": now,
                }
                for r in range(ranks)
            ],  # fmt: skip
        )
        for w in range(windows):
            record_rank_windows(
                session=session,
                job_id=job_id,
                attempt=1,
                windows=[
                    RankWindowStats(
                        rank=r,
                        node=f"node-{r // 8}",
                        window_start_step=20 + 5 * w,
                        window_end_step=24 + 5 * w,
                        num_steps=5,
                        mean_own_s=0.9,
                        median_own_s=1.3 if r // 8 == slow_node else 0.9,
                        p90_own_s=0.95,
                        mean_wall_s=1.31,
                        straggler_score=9.0 if r // 8 == slow_node else 0.2,
                        flagged=r // 8 == slow_node and w >= 2,
                    )
                    for r in range(ranks)
                ],  # fmt: skip
                now=now,
            )
    write_rank0_steps(run_dir, range(100))
    return job_id


def job_id(store: Store, name: str) -> int:
    with store.read() as session:
        return session.query(Job.id).filter(Job.name == name).scalar()


def main(argv: list[str]) -> int:
    """`python -m bench.stored_jobs DB_URL [--ranks N]`: a stored job of N ranks (default 16,384) named `large`
    and the `hostile` one, to look at with `VLCTL_DATABASE_URL=DB_URL vlctl ui`."""
    import argparse

    from controller.store import StoreConfig, open_store
    from controller.store.migrate import upgrade

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("url")
    parser.add_argument("--ranks", type=int, default=16_384)
    parser.add_argument("--run-root", type=Path, default=Path("runs/stored-jobs"))
    args = parser.parse_args(argv)
    store = open_store(StoreConfig(url=args.url))
    try:
        upgrade(store)
        store_large_job(store, args.run_root.resolve() / "large", ranks=args.ranks)
        store_hostile_job(store, args.run_root.resolve() / "hostile")
    finally:
        store.dispose()
    print(f"stored jobs large ({args.ranks} ranks) and hostile; VLCTL_DATABASE_URL={args.url} vlctl ui")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
