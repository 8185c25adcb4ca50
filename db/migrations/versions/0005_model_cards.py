"""Model cards: the submitter's own description of a model.

``models.card`` holds the card given at submission (RobustBench's fields: name,
authors, link, venue, architecture, claimed clean and robust accuracy, ...), so the
numbers a paper claims sit beside the numbers the service measured. Models submitted
without a card keep NULL.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    # A nullable column: SQLite adds it in place, no batch copy of the table needed.
    op.add_column("models", sa.Column("card", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Dropping one is what SQLite cannot do in place: batch mode copies the table.
    with op.batch_alter_table("models") as batch:
        batch.drop_column("card")
