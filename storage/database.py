"""Engine and schema management: one engine per URL and process, migrations through Alembic."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
WRITES = "seidra_writes"
# What an unreachable or overloaded database raises: callers wait and try again, or answer 503.
DATABASE_OUTAGES = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    # hide_parameters: a failed statement's error (logged) would otherwise carry its values, prompts included.
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True)


def _sqlite_engine(url: str) -> Engine:
    database = sa.engine.make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, hide_parameters=True
    )

    # Several processes (router, API replicas, CLI) share the file: WAL lets readers run beside the
    # single writer, and the busy timeout makes writers wait instead of failing.
    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        # pysqlite would open the transaction only at the first write, after our status check: we
        # issue BEGIN ourselves.
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        # A writer takes the write lock before its first read, so read-check-write is atomic (FOR
        # UPDATE's role). A reader takes none: in WAL mode it reads a snapshot beside the writer.
        writes = connection.get_execution_options().get(WRITES, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

    return engine


def for_writes(engine: Engine) -> Engine:
    """`engine`, sharing its pool, for transactions that write: on SQLite they lock at BEGIN."""
    return engine.execution_options(**{WRITES: True})


class Store:
    """A store's sessions: reads on the process's engine for its URL, writes as writers (`for_writes`).
    Rows stay readable after their session commits."""

    def __init__(self, database_url: str) -> None:
        self._engine = get_engine(database_url)
        self._writer = for_writes(self._engine)

    def _session(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    def _write_session(self) -> Session:
        return Session(self._writer, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read a '%' in a password as a format directive.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at `url` to `revision`; safe to run on every start."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
