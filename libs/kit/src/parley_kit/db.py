"""SQLAlchemy engines per process, transactions owned by the caller, Alembic migrations per service."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, DateTime, Engine, MetaData, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from .errors import database_connection_lost

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

log = logging.getLogger(__name__)
T = TypeVar("T")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes as UTC and hands them back in UTC (SQLite's naive values are UTC by construction)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        # PostgreSQL answers in the session's time zone, which a server or role setting may make non-UTC.
        return value.astimezone(UTC)


def retry_lost_connection(write: Callable[[], T], *, attempts: int = 3) -> T:
    """Run `write` (a whole transaction), again on a fresh connection when the database dropped the one it had (a
    restart, a killed backend): for writes that must not be lost and are safe to repeat. Other errors, and the last
    attempt's, are raised."""
    for attempt in range(1, attempts):
        try:
            return write()
        except Exception as exc:
            if not database_connection_lost(exc):
                raise
            log.warning("database connection lost; retrying the write", extra={"attempt": attempt})
    return write()


def run_statement(engine: Engine, statement: Callable[[Connection], T]) -> T:
    """Run work that is one statement and safe to repeat: in autocommit on PostgreSQL (a lone statement is its own
    transaction there, so no BEGIN and COMMIT round trips), in a transaction elsewhere; again on a fresh connection
    when the database dropped this one."""

    def run() -> T:
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                return statement(connection)
        with engine.begin() as connection:
            return statement(connection)

    return retry_lost_connection(run)


def make_metadata() -> MetaData:
    """Metadata with a naming convention, so Alembic migrations name constraints the same everywhere."""
    return MetaData(naming_convention=NAMING_CONVENTION)


def ensure_sqlite_directory(url: str) -> None:
    """SQLite creates its file but not the folder (`.run/` by default): make it before anything opens the file."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


class Database:
    """An engine and a session factory for one service's database, created after the worker forks.

    `pre_ping` tests each pooled connection with a round trip before lending it out. A service whose every database
    touch on the hot path is retried on a lost connection (`retry_lost_connection`) or may answer 503 can turn it off
    and save that round trip per request: a dropped connection then fails its first use, and SQLAlchemy discards the
    rest of the pool's older connections with it.
    """

    def __init__(self, url: str, *, pool_size: int = 10, pre_ping: bool = True) -> None:
        self.url = url
        ensure_sqlite_directory(url)
        if url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # pysqlite's own BEGIN handling defers locks; begin IMMEDIATE so a write transaction never
            # deadlocks upgrading a read lock.
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            self.engine = create_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=pre_ping, pool_recycle=1800
            )
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work commits when the block ends and rolls back if it raises."""
        with self.sessions.begin() as session:
            yield session

    def check(self) -> None:
        """Readiness: the database answers a trivial query."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close pooled connections (at shutdown, or in a forked child)."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    """WAL lets readers run beside the writer; foreign keys are off in SQLite unless asked for."""
    dbapi_connection.isolation_level = None  # let the "begin" listener issue BEGIN itself
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def upgrade(migrations_dir: Path, url: str) -> None:
    """Run a service's Alembic migrations to head against the given database."""
    from alembic import command
    from alembic.config import Config

    ensure_sqlite_directory(url)
    config = Config()
    config.set_main_option("script_location", str(migrations_dir))
    config.attributes["url"] = url  # not via set_main_option: configparser would choke on '%' in passwords
    command.upgrade(config, "head")


def run_alembic_env(target_metadata: MetaData) -> None:
    """The body of every service's `migrations/env.py`: online migrations against `attributes['url']`."""
    from alembic import context

    url = context.config.attributes["url"]
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=url.startswith("sqlite"),
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
