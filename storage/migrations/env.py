"""Alembic environment: runs against the URL given by `storage.database.upgrade`."""

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel

import storage.models  # noqa: F401  (registers the tables on SQLModel.metadata)
from storage.database import for_writes, get_engine

target_metadata = SQLModel.metadata


@contextmanager
def _sqlite_foreign_keys_off(connection: sa.Connection) -> Iterator[None]:
    """Batch migrations recreate tables; with foreign keys on, that would cascade-delete rows.

    SQLite ignores this pragma inside a transaction, and any statement through SQLAlchemy opens
    one: it goes to the driver's connection directly. The pooled connection gets it back after.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    driver_connection = connection.connection.driver_connection
    assert driver_connection is not None  # only an invalidated connection has none
    driver_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        connection.rollback()  # a failed migration may leave its transaction open
        driver_connection.execute("PRAGMA foreign_keys=ON")


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    # As a writer: concurrent `seidra up`s on one SQLite file take turns instead of failing.
    with for_writes(get_engine(url)).connect() as connection, _sqlite_foreign_keys_off(connection):
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `seidra db upgrade` against a database")
run_migrations_online()
