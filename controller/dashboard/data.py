"""The dashboard's documents: the read model (controller.views) as JSON, plus what only a page shows.

Every function takes an open read session of the store and returns plain JSON-ready values. The job and jobs
documents are `JobView.as_dict` (the same keys as `vlctl status -o json` and `vlctl list -o json`); events and
checkpoints are the rows of `vlctl events -o json` and `vlctl checkpoints -o json`. What the page adds: the loss
curve (the run folder's rank-0 JSONL, read from a byte offset so a live page fetches only new steps), the
straggler heatmap (the detector's windows in `rank_step_windows`), the attempts, and a large job's ranks as
node summaries and the ranks worth a look.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import case, func, select

from controller.domain.phases import Phase, SupervisionReason
from controller.store.tables import attempts, events, jobs, rank_step_windows
from controller.views import (
    checkpoint_dict,
    event_dict,
    iso,
    node_summaries,
    rank_dict,
    ranks_worth_a_look,
    read_job_views,
)
from trainer.contract.telemetry import JSONL_FILE

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

STRAGGLER_FLAGGED = SupervisionReason.STRAGGLER_FLAGGED
PAGE_RANKS = 32  # ranks listed on a job's page (the ones worth a look); all of them up to this many
PAGE_NODES = 64  # node summaries listed on a job's page
HEATMAP_RANK_ROWS = 64  # a heatmap row per rank up to this many ranks; above, a row per node
HEATMAP_NODE_ROWS = 64  # the nodes a large job's heatmap shows (the ones worth a look)
STEPS_CHUNK_BYTES = 8 << 20  # the most of the JSONL one steps request reads (a long run loads in chunks)
EVENTS_LIMIT = 2000  # the newest events a job's page lists


class NotFound(LookupError):
    """No job of that name."""


def _job_id(session: Session, name: str) -> int:
    job_id = session.execute(select(jobs.c.id).where(jobs.c.name == name)).scalar()
    if job_id is None:
        raise NotFound(f"no job named {name!r}")
    return int(job_id)


def jobs_document(session: Session, phase: str | None = None) -> list[dict[str, Any]]:
    """Every job (or those in `phase`), oldest first: `vlctl list -o json`'s rows."""
    if phase is not None and phase not in Phase.__members__.values():
        raise ValueError(f"phase: expected one of {', '.join(Phase)}, got {phase!r}")
    phases = None if phase is None else [Phase(phase)]
    return [v.as_dict(ranks=False) for v in read_job_views(session, phases=phases, ranks=False)]


def job_document(session: Session, name: str) -> dict[str, Any]:
    """One job: `vlctl status -o json`'s keys, its ranks as node summaries and the ranks worth a look (all of
    them for a small job), its attempts, checkpoints and newest events."""
    job_id = _job_id(session, name)
    (view,) = read_job_views(session, job_ids=[job_id])
    doc = view.as_dict(ranks=False)
    ranks = view.ranks or ()
    doc["num_ranks"] = len(ranks)
    doc["nodes_summary"] = [n.as_dict() for n in node_summaries(ranks)[:PAGE_NODES]]
    shown = (
        sorted(ranks, key=lambda r: r.rank)
        if len(ranks) <= PAGE_RANKS
        else ranks_worth_a_look(ranks, PAGE_RANKS)
    )
    doc["ranks"] = [rank_dict(r) for r in shown]
    # Why each flagged rank is slow: its newest StragglerFlagged report in this attempt (the rank rows hold the
    # flag and score; the cause and the slowdown are in the report).
    flagged = {r["rank"] for r in doc["ranks"] if r["flagged"]}
    causes: dict[int, dict[str, Any]] = {}
    if flagged:
        reports = session.execute(
            select(events.c.data)
            .where(
                events.c.job_id == job_id,
                events.c.attempt == view.attempt,
                events.c.reason == STRAGGLER_FLAGGED,
            )
            .order_by(events.c.seq)
        ).scalars()
        for data in reports:
            if isinstance(data, dict) and data.get("rank") in flagged:
                causes[data["rank"]] = {k: data.get(k) for k in ("cause", "phase", "slowdown", "step")}
    for r in doc["ranks"]:
        r["straggler"] = causes.get(r["rank"]) if r["flagged"] else None
    doc["attempts"] = _attempts(session, job_id)
    resume = (
        view.resume_from_step
        if view.resume_from_step is not None
        else (view.last_checkpoint.step if view.last_checkpoint is not None else None)
    )
    from controller.store.records import list_checkpoints  # the ORM, as `vlctl checkpoints`

    doc["checkpoints"] = [
        checkpoint_dict(c, resume_step=resume) for c in list_checkpoints(session=session, job_id=job_id)
    ]
    rows = session.execute(
        select(events).where(events.c.job_id == job_id).order_by(events.c.seq.desc()).limit(EVENTS_LIMIT)
    ).all()
    doc["events"] = [event_dict(e) for e in reversed(rows)]
    return doc


def _attempts(session: Session, job_id: int) -> list[dict[str, Any]]:
    rows = session.execute(
        select(attempts).where(attempts.c.job_id == job_id).order_by(attempts.c.number)
    ).all()

    return [
        {
            "number": a.number,
            "nodes": list(a.nodes or ()),
            "started": iso(a.started_at),
            "running": iso(a.running_at),
            "first_step": iso(a.first_step_at),
            "ended": iso(a.ended_at),
            "exit_class": a.exit_class,
            "failure_step": a.failure_step,
            "failure_message": a.failure_message,
            "resumed_from_step": a.resumed_from_step,
            "last_step": a.last_step,
        }
        for a in rows
    ]


def heatmap_document(session: Session, name: str) -> dict[str, Any]:
    """The current attempt's straggler windows: own-work median per rank and window, with the flagged cells.
    A job of more than HEATMAP_RANK_ROWS ranks gets a row per node (its slowest rank's median), and only the
    HEATMAP_NODE_ROWS nodes worth a look (the most flagged windows, then the slowest), under a first row with
    the median over all nodes: 2,048 rows would be a pixel each."""
    job_id = _job_id(session, name)
    attempt = session.execute(select(jobs.c.current_attempt).where(jobs.c.id == job_id)).scalar() or 0
    w = rank_step_windows.c
    where = (w.job_id == job_id) & (w.attempt == attempt)
    num_ranks = session.execute(select(func.count(func.distinct(w.rank))).where(where)).scalar() or 0
    by_node = num_ranks > HEATMAP_RANK_ROWS
    key = w.node if by_node else w.rank
    rows = session.execute(
        select(key, w.window_start_step, func.max(w.median_own_s), func.sum(case((w.flagged, 1), else_=0)))
        .where(where)
        .group_by(key, w.window_start_step)
    ).all()
    windows = sorted({r[1] for r in rows})
    col_of = {s: j for j, s in enumerate(windows)}
    values: dict[Any, list[float | None]] = {}
    flagged: dict[Any, dict[int, int]] = {}
    for k, start, own, n_flagged in rows:
        values.setdefault(k, [None] * len(windows))[col_of[start]] = own
        if n_flagged:
            flagged.setdefault(k, {})[col_of[start]] = int(n_flagged)
    labels: list[Any] = sorted(values)
    z = [values[k] for k in labels]
    note = None
    if by_node:

        def worth(k: Any) -> tuple[int, float, str]:
            return (
                -sum(flagged.get(k, {}).values()),
                -max((v for v in values[k] if v is not None), default=0.0),
                k,
            )

        everyone = [
            statistics.median(v[j] for v in values.values() if v[j] is not None) for j in range(len(windows))
        ]
        labels = sorted(values, key=worth)[:HEATMAP_NODE_ROWS]
        z = [everyone, *(values[k] for k in labels)]
        note = f"median of {len(values)} nodes"
        labels = [note, *labels]
    cells = [
        {"row": i, "window": j, "ranks": n}
        for i, k in enumerate(labels)
        for j, n in sorted(flagged.get(k, {}).items())
    ]
    return {
        "attempt": attempt,
        "by": "node" if by_node else "rank",
        "num_ranks": num_ranks,
        "num_rows": len(values),  # ranks or nodes with windows (the rows shown may be fewer)
        "rows": [str(k) for k in labels],
        "windows": windows,
        "own_work_s": z,
        "flagged": cells,
    }


def steps_document(session: Session, name: str, offset: int = 0) -> dict[str, Any]:
    """Rank 0's step lines from byte `offset` of its JSONL file in the run folder (every attempt's, in order):
    step, attempt, loss, the job's tokens/s (rank 0's replica times the data-parallel size) and MFU. `offset`
    in the answer is where the next request starts; a file shorter than `offset` (a new run folder) starts over.
    """
    row = session.execute(select(jobs.c.run_dir, jobs.c.spec).where(jobs.c.name == name)).first()
    if row is None:
        raise NotFound(f"no job named {name!r}")
    empty = {"points": [], "offset": offset, "reset": False}
    if not row.run_dir:
        return empty
    dp = _data_parallel(row.spec)
    path = Path(row.run_dir) / JSONL_FILE.format(rank=0)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return empty
    try:
        size = os.fstat(fd).st_size
        reset = offset > size
        start = 0 if reset else offset
        data = os.pread(fd, min(size - start, STEPS_CHUNK_BYTES), start)
    finally:
        os.close(fd)
    end = data.rfind(b"\n") + 1  # a line still being written is read by the next request
    points = []
    for line in data[:end].splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step_seconds" not in record:
            continue  # checkpoint lines
        points.append(_point(record, dp))
    return {"points": points, "offset": start + end, "reset": reset}


def _point(record: dict[str, Any], dp: int) -> dict[str, Any]:
    def number(key: str) -> float | None:
        value = record.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    wall = number("step_seconds")
    tokens = (number("text_tokens") or 0.0) + (number("vision_tokens") or 0.0)
    return {
        "step": record.get("step"),
        "attempt": record.get("attempt", 0),
        "time": number("time"),
        "loss": number("loss"),
        "tokens_per_second": tokens / wall * dp if wall else None,
        "mfu": number("mfu"),
    }


def _data_parallel(spec: Any) -> int:
    try:
        parallel = spec["training"]["parallel"]
        dp = int(parallel.get("dp") or 1)
    except (KeyError, TypeError, ValueError, AttributeError):
        return 1
    return max(dp, 1)
