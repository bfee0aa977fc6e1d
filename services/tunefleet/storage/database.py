"""Metadata storage: SQLAlchemy 2 on a SQLite file (embedded default) or PostgreSQL (cluster),
with the schema managed by Alembic migrations.

The same code runs on both; the differences are confined to `Database.__init__`: SQLite gets
WAL, foreign keys, a busy timeout and `BEGIN IMMEDIATE` transactions for writers (so concurrent
writers queue instead of failing with "database is locked"); readers (`Database.read`) take
none of the write lock.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import JSON, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

MIGRATIONS = Path(__file__).with_name("migrations")
MIGRATION_LOCK_ID = 0x7475_6E65  # "tune": serialises concurrent migrations on PostgreSQL


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store timezone-aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Base of every table. Constraint names follow one convention so migrations can name them."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {datetime: UtcDateTime(), dict[str, Any]: JsonDocument}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Database:
    """An engine, a session factory and the migrations for one database URL."""

    def __init__(self, url: str, *, echo: bool = False, busy_timeout: float = 30.0) -> None:
        parsed = make_url(url)
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                url,
                echo=echo,
                connect_args={"check_same_thread": False, "timeout": busy_timeout},
            )
            event.listen(
                self.engine,
                "connect",
                lambda connection, _record: _sqlite_on_connect(connection, busy_timeout),
            )
            event.listen(self.engine, "begin", _sqlite_begin)
        else:
            self.engine = create_engine(url, echo=echo, pool_pre_ping=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(
            self.engine.execution_options(tunefleet_read=True), expire_on_commit=False
        )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A transaction that only reads: on SQLite a deferred one, which neither waits for nor
        blocks writers (WAL), where `session()` takes the write lock at once."""
        with self._reads.begin() as session:
            yield session

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to `revision` (default: the newest). Safe to call from several
        processes at once: on PostgreSQL they take turns on an advisory lock."""
        with self.engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})")
            config = _alembic_config(self.url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def downgrade(self, revision: str) -> None:
        with self.engine.begin() as connection:
            config = _alembic_config(self.url)
            config.attributes["connection"] = connection
            command.downgrade(config, revision)

    def close(self) -> None:
        self.engine.dispose()


def _alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _sqlite_on_connect(dbapi_connection: Any, busy_timeout: float) -> None:
    # Let SQLAlchemy, not the driver, decide when transactions begin (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    cursor.execute("PRAGMA foreign_keys = ON")
    # Switching a new database to WAL needs an exclusive lock and, unlike other statements,
    # answers "database is locked" at once (without the busy timeout) while another connection
    # is open: retry for as long as the busy timeout would have waited.
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    # Writers take the write lock at the start: two deferred transactions that both upgrade to
    # writing would deadlock, and SQLite answers that with an immediate "database is locked".
    # Readers (Database.read) never upgrade, so theirs is deferred.
    if connection.get_execution_options().get("tunefleet_read"):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
