"""Robustness track: defense, transfer source and worker details on jobs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a table's columns in place.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("defense", sa.String(200), nullable=True))
        batch.add_column(sa.Column("source_model_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("details", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("details")
        batch.drop_column("source_model_id")
        batch.drop_column("defense")
