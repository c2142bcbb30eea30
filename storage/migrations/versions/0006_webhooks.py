"""webhooks

A job records the API key that submitted it and the webhook URL it gave; a key gets a default
webhook URL and the secret that signs its deliveries (every key from before gets a new secret of its
own, which nobody has seen: `seidra keys webhook-secret` makes one to hand over). `webhook_deliveries`
holds each delivery: its frozen body, its status and attempts.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import secrets

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

URL_CHARS = 2048
# The same shape as `storage.api_keys.new_webhook_secret`; a migration stays as it was written.
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def upgrade() -> None:
    # In place: a batch copy of generation_jobs would rebuild its indexes from SQLite's reflection,
    # which loses their DESC.
    with op.batch_alter_table("generation_jobs", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=12), nullable=True))
        batch_op.add_column(sa.Column("webhook_url", sqlmodel.sql.sqltypes.AutoString(length=URL_CHARS), nullable=True))
    with op.batch_alter_table("api_keys", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("webhook_url", sqlmodel.sql.sqltypes.AutoString(length=URL_CHARS), nullable=True))
        batch_op.add_column(sa.Column("webhook_secret", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
    _give_each_key_a_secret()
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("event", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("key_id", sqlmodel.sql.sqltypes.AutoString(length=12), nullable=False),
        sa.Column("url", sqlmodel.sql.sqltypes.AutoString(length=URL_CHARS), nullable=False),
        sa.Column("from_key_default", sa.Boolean(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("batch_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["generation_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_deliveries_job_id", ["job_id"], unique=False)
        batch_op.create_index("ix_webhook_deliveries_status_next_attempt_at", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_webhook_deliveries_owner_batch_id_status", ["owner", "batch_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_owner_batch_id_status")
        batch_op.drop_index("ix_webhook_deliveries_status_next_attempt_at")
        batch_op.drop_index("ix_webhook_deliveries_job_id")
    op.drop_table("webhook_deliveries")
    # In place too (SQLite 3.35 and later).
    with op.batch_alter_table("api_keys", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("webhook_secret")
        batch_op.drop_column("webhook_url")
    with op.batch_alter_table("generation_jobs", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("webhook_url")
        batch_op.drop_column("key_id")


def _give_each_key_a_secret() -> None:
    bind = op.get_bind()
    key_ids = bind.execute(sa.text("SELECT key_id FROM api_keys")).scalars().all()
    if key_ids:
        secrets_by_key = [{"key_id": key_id, "secret": SECRET_PREFIX + secrets.token_urlsafe(SECRET_BYTES)} for key_id in key_ids]
        bind.execute(sa.text("UPDATE api_keys SET webhook_secret = :secret WHERE key_id = :key_id"), secrets_by_key)
