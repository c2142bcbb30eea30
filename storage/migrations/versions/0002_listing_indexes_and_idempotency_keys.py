"""listing indexes and idempotency keys

Every listing reads an index in its own order: `created_at DESC, id` for the newest-first lists
(jobs, optionally by status, lane or batch; notifications, optionally by job or level) and
`status, priority, created_at, id` for the router's queue rebuild. The single-column indexes these
lead with go, and so does (status, lane): the status listing's index serves its only user.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from typing import Any

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

CREATED_DESC: sa.ColumnClause[Any] = sa.literal_column("created_at DESC")


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(length=64), server_default="", nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column("request_hash", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("job_ids", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=False),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", "key"),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index("ix_idempotency_keys_created_at", ["created_at"], unique=False)

    with op.batch_alter_table("generation_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_generation_jobs_status_lane")
        batch_op.drop_index("ix_generation_jobs_status")
        batch_op.drop_index("ix_generation_jobs_batch_id")
        batch_op.create_index("ix_generation_jobs_created_at_id", [CREATED_DESC, "id"], unique=False)
        batch_op.create_index("ix_generation_jobs_status_created_at_id", ["status", CREATED_DESC, "id"], unique=False)
        batch_op.create_index("ix_generation_jobs_lane_created_at_id", ["lane", CREATED_DESC, "id"], unique=False)
        batch_op.create_index("ix_generation_jobs_batch_id_created_at_id", ["batch_id", CREATED_DESC, "id"], unique=False)
        batch_op.create_index(
            "ix_generation_jobs_status_priority_created_at_id", ["status", "priority", "created_at", "id"], unique=False
        )

    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_job_id")
        batch_op.drop_index("ix_notifications_level")
        batch_op.create_index("ix_notifications_created_at_id", [CREATED_DESC, "id"], unique=False)
        batch_op.create_index("ix_notifications_job_id_created_at_id", ["job_id", CREATED_DESC, "id"], unique=False)
        batch_op.create_index("ix_notifications_level_created_at_id", ["level", CREATED_DESC, "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_level_created_at_id")
        batch_op.drop_index("ix_notifications_job_id_created_at_id")
        batch_op.drop_index("ix_notifications_created_at_id")
        batch_op.create_index("ix_notifications_level", ["level"], unique=False)
        batch_op.create_index("ix_notifications_job_id", ["job_id"], unique=False)

    with op.batch_alter_table("generation_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_generation_jobs_status_priority_created_at_id")
        batch_op.drop_index("ix_generation_jobs_batch_id_created_at_id")
        batch_op.drop_index("ix_generation_jobs_lane_created_at_id")
        batch_op.drop_index("ix_generation_jobs_status_created_at_id")
        batch_op.drop_index("ix_generation_jobs_created_at_id")
        batch_op.create_index("ix_generation_jobs_batch_id", ["batch_id"], unique=False)
        batch_op.create_index("ix_generation_jobs_status", ["status"], unique=False)
        batch_op.create_index("ix_generation_jobs_status_lane", ["status", "lane"], unique=False)

    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_idempotency_keys_created_at")
    op.drop_table("idempotency_keys")
