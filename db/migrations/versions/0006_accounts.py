"""Accounts: API users, their tokens, and who owns a model and whether it is public.

``users`` and ``tokens`` back the HTTP API's bearer tokens (only a hash of each token
is stored, found through its random prefix). ``models.owner_id`` names the account
that submitted a model through the API; ``models.public`` says whether everyone may
see it. Models that already exist were submitted through the CLI, so they keep no
owner and stay public (the server default fills them).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen like 0001: plain types, not db.schema's (UTCDateTime stores this type).
UTC_DATETIME = sa.DateTime(timezone=True)

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("last_used", UTC_DATETIME, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_tokens_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("prefix", name="uq_tokens_prefix"),
    )
    op.create_index("ix_tokens_user_id", "tokens", ["user_id"])
    # batch mode: SQLite cannot add a foreign key to an existing table in place.
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("public", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch.create_foreign_key(
            "fk_models_owner_id_users", "users", ["owner_id"], ["id"], ondelete="SET NULL"
        )
        batch.create_index("ix_models_owner_id", ["owner_id"])


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_index("ix_models_owner_id")
        batch.drop_constraint("fk_models_owner_id_users", type_="foreignkey")
        batch.drop_column("public")
        batch.drop_column("owner_id")
    op.drop_index("ix_tokens_user_id", table_name="tokens")
    op.drop_table("tokens")
    op.drop_table("users")
