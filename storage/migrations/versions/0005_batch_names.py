"""batch names

A batch id is a name its submitter may pick (`nightly-2026-12-01`), no longer only a UUID: the
`batch_id` of jobs and of idempotency keys becomes a string of up to 64 characters, and every UUID
stored becomes its canonical text (lowercase, with dashes), which names the same batch as before.

Downgrading turns each name back into a UUID: a UUID's text into that UUID, any other name into a
UUID made of its owner and itself, so that each owner's batches stay apart and whole.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import json
import uuid
from typing import Any

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("generation_jobs", "idempotency_keys")
BATCH_INDEX = "ix_generation_jobs_batch_id_created_at_id"
CREATED_DESC: sa.ColumnClause[Any] = sa.literal_column("created_at DESC")
# Where the UUIDs that stand for names on a downgrade come from. Fixed: downgrading twice gives the same.
DOWNGRADED_NAMES = uuid.UUID("0f6c1a4e-7d25-4c1b-9a8e-3b5d2e7f9c10")
# A UUID's canonical text from the column as sa.Uuid stores it: PostgreSQL's uuid type; 32 hex
# digits on SQLite. And back.
AS_TEXT = {
    "postgresql": "CAST(batch_id AS VARCHAR)",
    "sqlite": "substr(batch_id, 1, 8) || '-' || substr(batch_id, 9, 4) || '-' || substr(batch_id, 13, 4)"
    " || '-' || substr(batch_id, 17, 4) || '-' || substr(batch_id, 21)",
}
AS_UUID = {"postgresql": "CAST(batch_id AS UUID)", "sqlite": "replace(batch_id, '-', '')"}


def upgrade() -> None:
    for table in TABLES:
        _retype(table, sqlmodel.sql.sqltypes.AutoString(length=64), AS_TEXT)


def downgrade() -> None:
    for table in TABLES:
        _names_to_uuid_text(table)
        _retype(table, sa.Uuid(), AS_UUID)


def _retype(table: str, new_type: sa.types.TypeEngine[Any], convert: dict[str, str]) -> None:
    """`table.batch_id` with `new_type`, its values converted by the dialect's SQL expression.

    In place, on SQLite too: a new column filled from the old one takes its name and its index. A
    batch copy of the table, SQLite's way of changing a column's type, would rebuild the indexes
    from SQLite's reflection, which loses their DESC.
    """
    with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
        batch_op.add_column(sa.Column("batch_id_retyped", new_type, nullable=True))
    op.execute(f"UPDATE {table} SET batch_id_retyped = {convert[op.get_bind().dialect.name]} WHERE batch_id IS NOT NULL")
    with op.batch_alter_table(table, schema=None, recreate="never") as batch_op:
        if table == "generation_jobs":
            batch_op.drop_index(BATCH_INDEX)
        batch_op.drop_column("batch_id")
        batch_op.alter_column("batch_id_retyped", new_column_name="batch_id")
        if table == "generation_jobs":
            batch_op.create_index(BATCH_INDEX, ["batch_id", CREATED_DESC, "id"], unique=False)


def _names_to_uuid_text(table: str) -> None:
    """Every name of `table` that is not a UUID's canonical text replaced by that of a UUID of its own."""
    bind = op.get_bind()
    names = bind.execute(sa.text(f"SELECT DISTINCT owner, batch_id FROM {table} WHERE batch_id IS NOT NULL")).all()
    renamed = [
        {"owner": owner, "name": name, "uuid": str(uuid.uuid5(DOWNGRADED_NAMES, json.dumps([owner, name])))}
        for owner, name in names
        if not _is_uuid_text(name)
    ]
    if renamed:
        bind.execute(sa.text(f"UPDATE {table} SET batch_id = :uuid WHERE owner = :owner AND batch_id = :name"), renamed)


def _is_uuid_text(name: str) -> bool:
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False
