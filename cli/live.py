"""The live view of one job (`vlctl run`, `vlctl demo`): step, loss, tokens/s, ETA, restarts, stragglers."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from sqlalchemy import select

from controller.store.models import RankStatus
from controller.store.repo import get_job


def job_snapshot(db, name: str) -> dict[str, Any]:
    """What the view shows, read from the store in one transaction."""
    with db.read() as session:
        job = get_job(session=session, name=name)
        ranks = session.scalars(
            select(RankStatus).where(RankStatus.job_id == job.id).order_by(RankStatus.rank)
        )
        rows = [
            {
                "rank": r.rank,
                "node": r.node,
                "pid": r.pid,
                "step": r.step,
                "own_work_s": r.own_work_s,
                "step_s": r.step_s,
                "score": r.straggler_score,
                "flagged": r.flagged,
            }
            for r in ranks
        ]
        steps = [r["step_s"] for r in rows if r["step_s"]]
        eta = None
        if job.total_steps is not None and job.current_step is not None and steps:
            eta = max(0, job.total_steps - job.current_step) * sorted(steps)[len(steps) // 2]
        return {
            "name": job.name,
            "phase": str(job.phase),
            "reason": job.phase_reason,
            "message": job.phase_message,
            "attempt": job.current_attempt,
            "restarts": job.num_restarts,
            "step": job.current_step,
            "total_steps": job.total_steps,
            "loss": job.loss,
            "tokens_per_second": job.tokens_per_second,
            "eta_seconds": eta,
            "last_checkpoint_step": job.last_checkpoint_step,
            "ettr": job.ettr,
            "ranks": rows,
        }


def _fmt(value: Any, spec: str = "", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def render_snapshot(s: dict[str, Any]) -> Group:
    step = f"{_fmt(s['step'])}/{_fmt(s['total_steps'])}"
    eta = "-" if s["eta_seconds"] is None else f"{s['eta_seconds'] / 60:.1f} min"
    ettr = "-" if s["ettr"] is None else f"{s['ettr']:.0%}"
    head = Text(
        f"{s['name']}  {s['phase']}  attempt {s['attempt']}  step {step}  loss {_fmt(s['loss'], '.3f')}  "
        f"{_fmt(s['tokens_per_second'], ',.0f')} tok/s  ETA {eta}  restarts {s['restarts']}  "
        f"checkpoint {_fmt(s['last_checkpoint_step'])}  ETTR {ettr}"
    )
    table = Table(box=None, pad_edge=False)
    for column in ("rank", "node", "pid", "step", "own work s", "score", "straggler"):
        table.add_column(column)
    for r in s["ranks"]:
        table.add_row(
            str(r["rank"]),
            r["node"],
            _fmt(r["pid"]),
            _fmt(r["step"]),
            _fmt(r["own_work_s"], ".3f"),
            _fmt(r["score"], ".1f"),
            "FLAGGED" if r["flagged"] else "",
        )
    return Group(head, table)
