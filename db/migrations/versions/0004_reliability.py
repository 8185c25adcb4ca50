"""Reliability: a note on each model, a job's own failure count, longer suite names.

``models.note`` records what the service did to a submission (weights converted to
float32). ``jobs.failures`` counts a job's own transient failures. ``jobs.suite`` grows
to 200 characters, the bound every user-given name has, since a suite may be named by
the path of the user's YAML file.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a table's columns in place.
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        # The server default fills the rows that already exist.
        batch.add_column(sa.Column("failures", sa.Integer(), nullable=False, server_default="0"))
        batch.alter_column(
            "suite", existing_type=sa.String(100), type_=sa.String(200), existing_nullable=True
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column(
            "suite", existing_type=sa.String(200), type_=sa.String(100), existing_nullable=True
        )
        batch.drop_column("failures")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("note")
