"""Database helpers on SQLite and the real PostgreSQL: aware UTC datetimes, transactions, checks, migrations."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from kit_models import Base, Event
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError

from parley_kit.db import Database, ensure_sqlite_directory, upgrade, utcnow

MIGRATIONS = Path(__file__).resolve().parent / "kit_migrations"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A Database with the events table, on each engine."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'kit.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database(f"kit_db_{uuid.uuid4().hex[:8]}")
    db = Database(url)
    Base.metadata.create_all(db.engine)
    yield db
    db.dispose()


def test_utcnow_is_aware_utc() -> None:
    now = utcnow()
    assert now.tzinfo is UTC
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_aware_datetime_round_trip(database: Database) -> None:
    plus_two = datetime(2025, 3, 30, 1, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    with database.transaction() as session:
        session.add_all(
            [Event(name="tz", happened_at=plus_two), Event(name="utc", happened_at=utcnow()), Event(name="none")]
        )
    database.engine.dispose()  # read back on a fresh connection, not from the identity map
    with database.transaction() as session:
        stored = {event.name: event.happened_at for event in session.scalars(select(Event))}
    assert stored["tz"] == plus_two  # the same instant ...
    assert stored["tz"].utcoffset() == timedelta(0)  # ... handed back in UTC
    assert stored["tz"].hour == 23 and stored["tz"].day == 29
    assert stored["utc"].tzinfo is not None
    assert stored["none"] is None


def test_utc_comparison_in_queries(database: Database) -> None:
    base = datetime(2025, 1, 1, 12, tzinfo=UTC)
    with database.transaction() as session:
        session.add_all([Event(name=f"e{n}", happened_at=base + timedelta(hours=n)) for n in range(5)])
    with database.transaction() as session:
        cutoff = (base + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-5)))
        later = session.scalars(select(Event.name).where(Event.happened_at >= cutoff).order_by(Event.name)).all()
    assert later == ["e2", "e3", "e4"]


def test_naive_datetime_refused(database: Database) -> None:
    with pytest.raises(StatementError, match="naive datetime"), database.transaction() as session:
        session.add(Event(name="naive", happened_at=datetime(2025, 1, 1, 12)))
        session.flush()
    with database.transaction() as session:
        assert session.scalar(select(Event).where(Event.name == "naive")) is None


def test_transaction_commits(database: Database) -> None:
    with database.transaction() as session:
        session.add(Event(name="kept"))
    with database.transaction() as session:
        assert session.scalar(select(Event.name)) == "kept"


def test_transaction_rolls_back_on_error(database: Database) -> None:
    with pytest.raises(RuntimeError), database.transaction() as session:
        session.add(Event(name="lost"))
        session.flush()
        raise RuntimeError("after the insert")
    with database.transaction() as session:
        assert session.scalars(select(Event)).all() == []


def test_integrity_error_rolls_back_the_whole_transaction(database: Database) -> None:
    with pytest.raises(IntegrityError), database.transaction() as session:
        session.add(Event(name="first"))
        session.flush()
        session.add(Event(name="first"))
    with database.transaction() as session:
        assert session.scalars(select(Event)).all() == []


def test_objects_stay_readable_after_commit(database: Database) -> None:
    with database.transaction() as session:
        event = Event(name="readable", happened_at=utcnow())
        session.add(event)
    assert event.name == "readable" and event.id is not None  # expire_on_commit=False


def test_check_passes_on_a_live_database(database: Database) -> None:
    database.check()


def test_check_fails_on_a_missing_database(postgres) -> None:  # type: ignore[no-untyped-def]
    from sqlalchemy.engine import make_url

    url = make_url(postgres.admin_url).set(database="parley_no_such_database").render_as_string(hide_password=False)
    with pytest.raises(OperationalError):
        Database(url).check()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'p.db'}")
    with db.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    db.dispose()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_upgrade_runs_the_migrations(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if engine == "sqlite":
        url = f"sqlite:///{tmp_path / 'migrated.db'}"
    else:
        url = request.getfixturevalue("postgres").create_database("kit_migrate")
    upgrade(MIGRATIONS, url)
    upgrade(MIGRATIONS, url)  # idempotent at head
    db = Database(url)
    inspector = inspect(db.engine)
    assert {"events", "alembic_version"} <= set(inspector.get_table_names())
    assert inspector.get_pk_constraint("events")["name"] == "pk_events"
    with db.transaction() as session:
        session.add(Event(name="migrated", happened_at=utcnow()))
    with db.transaction() as session:
        assert session.scalar(select(Event.happened_at)).utcoffset() == timedelta(0)
        assert session.scalar(text("SELECT version_num FROM alembic_version")) == "0001"
    db.dispose()


def test_postgres_session_in_another_time_zone_still_gives_utc(postgres) -> None:  # type: ignore[no-untyped-def]
    url = postgres.create_database("kit_tz")
    db = Database(url + "?options=-c%20timezone%3DAsia/Kolkata")
    Base.metadata.create_all(db.engine)
    instant = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    with db.transaction() as session:
        assert session.scalar(text("SHOW timezone")) == "Asia/Kolkata"
        session.add(Event(name="x", happened_at=instant))
    db.engine.dispose()
    with db.transaction() as session:
        stored = session.scalar(select(Event.happened_at))
    assert stored == instant
    assert stored.utcoffset() == timedelta(0)
    db.dispose()


def test_sqlite_folder_is_created(tmp_path: Path) -> None:
    """SQLite creates its file but not the folder: the kit makes it, and leaves other URLs alone."""
    ensure_sqlite_directory(f"sqlite:///{tmp_path}/deep/run/auth.db")
    assert (tmp_path / "deep" / "run").is_dir()
    ensure_sqlite_directory("postgresql+psycopg://x@127.0.0.1/db")
    Database(f"sqlite:///{tmp_path}/other/x.db").check()
    assert (tmp_path / "other" / "x.db").exists()
