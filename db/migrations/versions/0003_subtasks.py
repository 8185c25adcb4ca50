"""Backdoor and privacy track: per-job sub-task records (PATE teachers).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen like 0001: plain types, not db.schema's (UTCDateTime stores this type).
UTC_DATETIME = sa.DateTime(timezone=True)

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subtasks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "job_id",
            sa.Integer(),
            sa.ForeignKey("jobs.id", ondelete="CASCADE", name="fk_subtasks_job_id_jobs"),
            nullable=False,
        ),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("node_id", sa.String(100), nullable=True),
        sa.Column("worker_pid", sa.Integer(), nullable=True),
        sa.Column("gpu_ids", sa.JSON(), nullable=True),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("finished_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_subtasks"),
        sa.UniqueConstraint("job_id", "name", name="uq_subtasks_job_id_name"),
    )
    op.create_index("ix_subtasks_job_id", "subtasks", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_subtasks_job_id", table_name="subtasks")
    op.drop_table("subtasks")
