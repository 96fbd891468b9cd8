"""rank_status leaves half of each page free (PostgreSQL's fillfactor 50).

The controller refreshes a job's rank rows every second within a budget (controller.store.records.RankRows).
With full pages each update wrote its new row version on another page and an entry in each of the table's
indexes; with room on the page PostgreSQL updates heap-only (HOT), and the WAL of those updates at 16,384 ranks
falls from 98-100 KB/s to 38 KB/s (bench/bench_controller_scale.py). Pages already full make room as they are
vacuumed. SQLite has no such setting: nothing to do there.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FILLFACTOR = 50  # spelled out: a revision stays as it was written whatever the code becomes


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE rank_status SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE rank_status RESET (fillfactor)")
