"""Initial schema: jobs, attempts, events, checkpoints, rank step windows, node health.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column(
            "phase",
            sa.Enum(
                "pending",
                "launching",
                "running",
                "restarting",
                "succeeded",
                "failed",
                "cancelled",
                name="phase",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("phase_reason", sa.String(length=64), nullable=False),
        sa.Column("phase_message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_attempt", sa.Integer(), nullable=False),
        sa.Column("num_restarts", sa.Integer(), nullable=False),
        sa.Column("num_restarts_counted", sa.Integer(), nullable=False),
        sa.Column("last_checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("last_checkpoint_uri", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("event_seq", sa.Integer(), nullable=False),
        sa.Column("productive_seconds", sa.Double(), nullable=False),
        sa.Column("lost_seconds", sa.JSON(), nullable=False),
        sa.Column("ettr", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("name", name=op.f("uq_jobs_name")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_phase"), ["phase"], unique=False)

    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("nodes", sa.JSON(), nullable=False),
        sa.Column("launched_by", sa.String(length=128), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("running_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("exit_class", sa.String(length=64), nullable=True),
        sa.Column("exit_detail", sa.Text(), nullable=True),
        sa.Column("resumed_from_step", sa.Integer(), nullable=True),
        sa.Column("resumed_from_uri", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_attempts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
        sa.UniqueConstraint("job_id", "number", name=op.f("uq_attempts_job_id_number")),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("committed", sa.Boolean(), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("save_seconds", sa.Double(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_checkpoints_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("job_id", "step", name=op.f("uq_checkpoints_job_id_step")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_events_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("job_id", "seq", name=op.f("uq_events_job_id_seq")),
    )
    op.create_table(
        "node_health",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=253), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("excluded", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_node_health_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_health")),
    )
    with op.batch_alter_table("node_health", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_health_node"), ["node"], unique=False)

    op.create_table(
        "rank_step_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("node", sa.String(length=253), nullable=False),
        sa.Column("window_start_step", sa.Integer(), nullable=False),
        sa.Column("window_end_step", sa.Integer(), nullable=False),
        sa.Column("num_steps", sa.Integer(), nullable=False),
        sa.Column("mean_own_s", sa.Double(), nullable=False),
        sa.Column("median_own_s", sa.Double(), nullable=False),
        sa.Column("p90_own_s", sa.Double(), nullable=False),
        sa.Column("mean_wall_s", sa.Double(), nullable=False),
        sa.Column("straggler_score", sa.Double(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_rank_step_windows_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rank_step_windows")),
        sa.UniqueConstraint(
            "job_id",
            "attempt",
            "rank",
            "window_start_step",
            name=op.f("uq_rank_step_windows_job_id_attempt_rank_window_start_step"),
        ),
    )
    with op.batch_alter_table("rank_step_windows", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_rank_step_windows_job_id_window_start_step"),
            ["job_id", "window_start_step"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("rank_step_windows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rank_step_windows_job_id_window_start_step"))

    op.drop_table("rank_step_windows")
    with op.batch_alter_table("node_health", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_health_node"))

    op.drop_table("node_health")
    op.drop_table("events")
    op.drop_table("checkpoints")
    op.drop_table("attempts")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_phase"))

    op.drop_table("jobs")
