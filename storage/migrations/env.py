"""Alembic environment: runs against the URL given by `storage.database.upgrade`."""

from alembic import context
from sqlmodel import SQLModel

import storage.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from storage.database import get_engine

target_metadata = SQLModel.metadata


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    with get_engine(url).connect() as connection:
        if connection.dialect.name == "sqlite":
            # Batch migrations recreate tables; with foreign keys on, that would cascade-delete rows.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `seidra db upgrade` against a database")
run_migrations_online()
