"""models and LoRA adapters

A job names the model it asks for (one of the served models; '' for the default, which every row
from before gets) and the LoRA adapters applied to it, as a JSON list of {"name", "scale"}.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Both columns are added in place: a batch copy of the table would rebuild its indexes from
    # SQLite's reflection, which loses their DESC.
    with op.batch_alter_table("generation_jobs", schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("model", sqlmodel.sql.sqltypes.AutoString(length=128), server_default="", nullable=False))
        batch_op.add_column(
            sa.Column("loras", sa.JSON().with_variant(JSONB(), "postgresql"), server_default=sa.text("'[]'"), nullable=False)
        )


def downgrade() -> None:
    # In place too (SQLite 3.35 and later).
    with op.batch_alter_table("generation_jobs", schema=None, recreate="never") as batch_op:
        batch_op.drop_column("loras")
        batch_op.drop_column("model")
