"""Live progress on jobs (step, loss, tokens/s, checkpoint interval, a resume request) and per-rank status.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rank_status",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=253), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("step", sa.Integer(), nullable=True),
        sa.Column("last_progress_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("own_work_s", sa.Double(), nullable=True),
        sa.Column("step_s", sa.Double(), nullable=True),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("straggler_score", sa.Double(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_rank_status_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rank_status")),
        sa.UniqueConstraint("job_id", "rank", name=op.f("uq_rank_status_job_id_rank")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("current_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("total_steps", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("loss", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("tokens_per_second", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("checkpoint_interval_steps", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("resume_from_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("run_dir", sa.Text(), nullable=True))
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("backend_record", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("first_step_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("detected_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_step", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("checkpoint_stall_seconds", sa.Double(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("straggler_seconds", sa.Double(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        for column in (
            "straggler_seconds",
            "checkpoint_stall_seconds",
            "last_step",
            "detected_at",
            "failed_at",
            "first_step_at",
            "backend_record",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("run_dir")
        batch_op.drop_column("next_attempt_at")
        batch_op.drop_column("resume_from_step")
        batch_op.drop_column("checkpoint_interval_steps")
        batch_op.drop_column("progress_at")
        batch_op.drop_column("tokens_per_second")
        batch_op.drop_column("loss")
        batch_op.drop_column("total_steps")
        batch_op.drop_column("current_step")

    op.drop_table("rank_status")
