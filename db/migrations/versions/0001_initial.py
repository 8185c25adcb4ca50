"""The initial schema: models, jobs, metrics, outcomes.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand and frozen: it spells out plain column types instead of importing
``db.schema``, so later changes to the models cannot change what this revision does.
Names follow ``db.schema.NAMING_CONVENTION``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
JOB_STATUSES = ("queued", "running", "done", "failed")


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("arch", sa.String(100), nullable=False),
        sa.Column("dataset", sa.String(100), nullable=False),
        sa.Column("input_spec", sa.JSON(), nullable=False),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("parent_id", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.ForeignKeyConstraint(["parent_id"], ["models.id"], name="fk_models_parent_id_models"),
    )
    statuses = ", ".join(f"'{status}'" for status in JOB_STATUSES)
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_key", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("suite", sa.String(100), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("dataset", sa.String(100), nullable=False),
        sa.Column("attack", sa.String(100), nullable=False),
        sa.Column("norm", sa.String(16), nullable=True),
        sa.Column("eps", sa.Float(), nullable=True),
        sa.Column("subset_key", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", UTC_DATETIME, nullable=True),
        sa.Column("stream_id", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("worker_host", sa.String(200), nullable=True),
        sa.Column("device", sa.String(100), nullable=True),
        sa.Column("code_version", sa.String(100), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name="fk_jobs_model_id_models"),
        sa.UniqueConstraint("job_key", name="uq_jobs_job_key"),
        sa.CheckConstraint(f"status IN ({statuses})", name="ck_jobs_job_status"),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_model_id", "jobs", ["model_id"])
    op.create_index("ix_jobs_group", "jobs", ["dataset", "norm", "eps", "subset_key"])
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("ci_low", sa.Float(), nullable=True),
        sa.Column("ci_high", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_metrics_job_id_jobs", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("job_id", "name", name="uq_metrics_job_id_name"),
    )
    op.create_table(
        "outcomes",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("clean", sa.LargeBinary(), nullable=False),
        sa.Column("robust", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_outcomes"),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_outcomes_job_id_jobs", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("outcomes")
    op.drop_table("metrics")
    op.drop_index("ix_jobs_group", table_name="jobs")
    op.drop_index("ix_jobs_model_id", table_name="jobs")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("models")
