"""A failed attempt's classification as typed columns (retryable, counts toward the limit, step, message).

Until now the classification lived only in the JSON data of the attempt's Failure event, and the restart
policy's history was parsed back from there. The upgrade fills the new columns of existing attempts from those
events (best effort, with the old reader's rules: a missing flag is True, a step that is no number is None), so a job that restarts
across the upgrade keeps its crash-loop history. The events keep their data.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Spelled out rather than imported: a revision stays as it was written whatever the code becomes.
FAILURE_EVENT_TYPE = "Failure"
EXIT_CLASS_MAX_LEN = 64

_attempts = sa.table(
    "attempts",
    sa.column("job_id", sa.Integer()),
    sa.column("number", sa.Integer()),
    sa.column("exit_class", sa.String(EXIT_CLASS_MAX_LEN)),
    sa.column("retryable", sa.Boolean()),
    sa.column("counts_toward_limit", sa.Boolean()),
    sa.column("failure_step", sa.Integer()),
    sa.column("failure_message", sa.Text()),
)
_events = sa.table(
    "events",
    sa.column("job_id", sa.Integer()),
    sa.column("seq", sa.Integer()),
    sa.column("attempt", sa.Integer()),
    sa.column("type", sa.String(32)),
    sa.column("message", sa.Text()),
    sa.column("data", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retryable", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("counts_toward_limit", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("failure_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("failure_message", sa.Text(), nullable=True))
    _fill_from_failure_events(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        for column in ("failure_message", "failure_step", "counts_toward_limit", "retryable"):
            batch_op.drop_column(column)


def _fill_from_failure_events(bind: sa.Connection) -> None:
    """Copy each attempt's classification from its Failure event; attempts without one keep NULL (no
    classified failure), as the old reader skipped them too."""
    events = bind.execute(
        sa.select(_events.c.job_id, _events.c.attempt, _events.c.message, _events.c.data)
        .where(_events.c.type == FAILURE_EVENT_TYPE, _events.c.attempt.is_not(None))
        .order_by(_events.c.job_id, _events.c.seq)
    )
    # Keyed by attempt: were there two classified Failure events for one attempt, the later one wins.
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for job_id, attempt, message, data in events:
        if not isinstance(data, dict) or not isinstance(data.get("exit_class"), str):
            continue  # a Failure event that is no classification (e.g. the stacks dumped before a hang's stop)
        step = data.get("step")
        rows[(job_id, attempt)] = {
            "b_job_id": job_id,
            "b_number": attempt,
            "b_exit_class": data["exit_class"][:EXIT_CLASS_MAX_LEN],
            "b_retryable": _flag(data, "retryable"),
            "b_counts_toward_limit": _flag(data, "counts_toward_limit"),
            "b_failure_step": step if isinstance(step, int) and not isinstance(step, bool) else None,
            "b_failure_message": message or "",
        }
    if not rows:
        return
    bind.execute(
        sa.update(_attempts)
        .where(_attempts.c.job_id == sa.bindparam("b_job_id"), _attempts.c.number == sa.bindparam("b_number"))
        .values(
            # The state machine wrote the class when the attempt ended; the event's is the fallback.
            exit_class=sa.func.coalesce(_attempts.c.exit_class, sa.bindparam("b_exit_class")),
            retryable=sa.bindparam("b_retryable"),
            counts_toward_limit=sa.bindparam("b_counts_toward_limit"),
            failure_step=sa.bindparam("b_failure_step"),
            failure_message=sa.bindparam("b_failure_message"),
        ),
        list(rows.values()),
    )


def _flag(data: dict[str, Any], key: str) -> bool:
    """As the old reader took it: a missing flag is True, any other value its truth."""
    return bool(data.get(key, True))
