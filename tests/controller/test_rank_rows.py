"""`rank_status` rows written within a budget (controller.store.records.RankRows), on SQLite and PostgreSQL: a
small job's rows every pass; at scale the urgent changes at once and the rest in turn, every row refreshed
within ranks / budget seconds, and the rows of ranks past the world size gone."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from controller.store.records import RankRows
from controller.store.repo import create_job
from controller.store.session import Store
from controller.store.tables import rank_status

T0 = 1_700_000_000.0


def _rows(n: int, *, step: int, flagged: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    return [
        {
            "rank": r,
            "node": f"node-{r // 8}",
            "pid": 1000 + r,
            "step": step,
            "last_progress": T0 + step,
            "own_work_s": 0.9,
            "step_s": 1.0,
            "loss": 2.0,
            "straggler_score": 0.1,
            "flagged": r in flagged,
        }
        for r in range(n)
    ]


def _table(store: Store, job_id: int) -> dict[int, dict[str, Any]]:
    with store.read() as session:
        rows = session.execute(select(rank_status).where(rank_status.c.job_id == job_id)).mappings()
        return {r["rank"]: dict(r) for r in rows}


def test_rank_rows_are_written_within_their_budget(migrated_store: Store) -> None:
    store = migrated_store
    with store.transaction() as session:
        job_id = create_job(session=session, name="rows", spec={"name": "rows"}).id
        small = create_job(session=session, name="small", spec={"name": "small"}).id
    # A small job: every row every pass.
    writer = RankRows(4, rows_per_second=256)
    for step in range(3):
        with store.transaction() as session:
            assert (
                writer.write(
                    session=session, job_id=small, attempt=1, rows=_rows(4, step=step), now=T0 + step
                )
                == 4
            )
    assert {r["step"] for r in _table(store, small).values()} == {2}

    # A big one: rows of an older, larger attempt are there; the first pass deletes the extra ones and writes all.
    with store.transaction() as session:
        RankRows(1200).write(session=session, job_id=job_id, attempt=1, rows=_rows(1200, step=0), now=T0)
    writer = RankRows(1000, rows_per_second=100)
    with store.transaction() as session:
        assert (
            writer.write(session=session, job_id=job_id, attempt=2, rows=_rows(1000, step=0), now=T0) == 1000
        )
    table = _table(store, job_id)
    assert sorted(table) == list(range(1000)) and {r["attempt"] for r in table.values()} == {2}

    # One pass a second: 100 rows of steps refreshed a pass, plus the urgent change (rank 700 flagged) at once.
    with store.transaction() as session:
        n = writer.write(
            session=session,
            job_id=job_id,
            attempt=2,
            rows=_rows(1000, step=1, flagged=frozenset({700})),
            now=T0 + 1,
        )
    assert n == 101
    table = _table(store, job_id)
    assert table[700]["flagged"] and table[700]["step"] == 1
    assert sum(r["step"] == 1 for r in table.values()) == 101
    # Ten passes later every rank's row has been refreshed (round robin), none twice in a pass.
    for i in range(2, 12):
        with store.transaction() as session:
            n = writer.write(
                session=session,
                job_id=job_id,
                attempt=2,
                rows=_rows(1000, step=i, flagged=frozenset({700})),
                now=T0 + i,
            )
        assert n == 100
    table = _table(store, job_id)
    assert min(r["step"] for r in table.values()) >= 2
    with store.read() as session:
        count = session.scalar(
            select(func.count()).select_from(rank_status).where(rank_status.c.job_id == job_id)
        )
    assert count == 1000
