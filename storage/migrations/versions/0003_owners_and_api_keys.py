"""owners and API keys

Jobs and notifications record their owner (the API key's user); rows from before get '' (no
owner: admins alone see them), and a user's newest-first listings read an index led by owner.
`api_keys` holds each key's id, the sha256 of the key's text (never the key), its user, scope,
lifetime and per-key quota overrides.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from typing import Any

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

CREATED_DESC: sa.ColumnClause[Any] = sa.literal_column("created_at DESC")


def _owner() -> sa.Column[Any]:
    return sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=64), server_default="", nullable=False)


def upgrade() -> None:
    with op.batch_alter_table("generation_jobs", schema=None) as batch_op:
        batch_op.add_column(_owner())
        batch_op.create_index("ix_generation_jobs_owner_created_at_id", ["owner", CREATED_DESC, "id"], unique=False)
        batch_op.create_index(
            "ix_generation_jobs_owner_status_created_at_id", ["owner", "status", CREATED_DESC, "id"], unique=False
        )

    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.add_column(_owner())
        batch_op.create_index("ix_notifications_owner_created_at_id", ["owner", CREATED_DESC, "id"], unique=False)

    op.create_table(
        "api_keys",
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=12), nullable=False),
        sa.Column("secret_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("user", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_waiting_realtime", sa.Integer(), nullable=True),
        sa.Column("max_waiting_batch", sa.Integer(), nullable=True),
        sa.Column("submissions_per_minute", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index("ix_api_keys_user", ["user"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_api_keys_user")
    op.drop_table("api_keys")

    # SQLite drops a column in place (3.35 and later): a batch copy of the table would rebuild its
    # indexes from SQLite's reflection, which loses their DESC.
    with op.batch_alter_table("notifications", schema=None, recreate="never") as batch_op:
        batch_op.drop_index("ix_notifications_owner_created_at_id")
        batch_op.drop_column("owner")

    with op.batch_alter_table("generation_jobs", schema=None, recreate="never") as batch_op:
        batch_op.drop_index("ix_generation_jobs_owner_status_created_at_id")
        batch_op.drop_index("ix_generation_jobs_owner_created_at_id")
        batch_op.drop_column("owner")
