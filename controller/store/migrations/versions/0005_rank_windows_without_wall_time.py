"""rank_step_windows.mean_wall_s may be empty.

The controller now records the straggler detector's windows (the dashboard's heatmap reads them). The detector
judges own work only (wall time is the same on every rank of a synchronous job), so a window it records has no
wall time: the column takes NULL instead of a made-up value.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rank_step_windows", schema=None) as batch_op:
        batch_op.alter_column("mean_wall_s", existing_type=sa.Double(), nullable=True)


def downgrade() -> None:
    op.execute("UPDATE rank_step_windows SET mean_wall_s = 0 WHERE mean_wall_s IS NULL")
    with op.batch_alter_table("rank_step_windows", schema=None) as batch_op:
        batch_op.alter_column("mean_wall_s", existing_type=sa.Double(), nullable=False)
