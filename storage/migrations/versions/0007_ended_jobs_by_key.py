"""ended jobs by key

An index on when keyed jobs ended: a router that starts looks for the jobs its predecessor ended but
stored no webhook delivery for (it died in between), among those that ended within the retry window.
Partial: jobs without a key have no deliveries.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

INDEX = "ix_generation_jobs_finished_at_keyed"
KEYED = sa.text("key_id IS NOT NULL")


def upgrade() -> None:
    op.create_index(INDEX, "generation_jobs", ["finished_at"], postgresql_where=KEYED, sqlite_where=KEYED)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="generation_jobs")
