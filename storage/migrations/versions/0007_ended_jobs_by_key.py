"""ended jobs by key

A router that starts looks for the jobs its predecessor ended but stored no webhook delivery for (it
died in between), among those that ended within the retry window. For that: an index on when keyed
jobs ended (partial: jobs without a key have no deliveries), and since when each key's default
webhook is what it is, so that a default set after a job ended is not taken for that job's. Keys
with a default from before get this migration's time: their jobs that ended earlier are left alone.

The index is built without locking writes out on PostgreSQL (CONCURRENTLY, outside a transaction).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEX = "ix_generation_jobs_finished_at_keyed"
KEYED = sa.text("key_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("webhook_url_since", sa.DateTime(timezone=True), nullable=True))
    keys = sa.table("api_keys", sa.column("webhook_url", sa.String()), sa.column("webhook_url_since", sa.DateTime(timezone=True)))
    op.execute(keys.update().where(keys.c.webhook_url.is_not(None)).values(webhook_url_since=datetime.now(timezone.utc)))
    with op.get_context().autocommit_block():
        op.create_index(
            INDEX, "generation_jobs", ["finished_at"], postgresql_where=KEYED, sqlite_where=KEYED, postgresql_concurrently=True
        )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="generation_jobs")
    with op.batch_alter_table("api_keys", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("webhook_url_since")
