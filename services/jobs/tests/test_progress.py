"""A batch's progress counters: moved with every item that leaves `pending` (results, skips, expiry), exactly one
writer sees the last item even when many finish at once, and they say what the items say (real PostgreSQL, and
SQLite where marked)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, func, select, text

from parley_jobs import MIGRATIONS, batches, files
from parley_jobs.models import BatchItem, BatchProgress, File, ItemStatus
from parley_jobs.relay import Relay
from parley_kit.db import Database, utcnow
from parley_kit.testing import eventually

from .conftest import chat_line, jsonl


def new_batch(db: Database, lines: int, *, owner: str = "user-a") -> tuple[str, list[str]]:
    """A batch of `lines` chat lines made the way the API makes it; (batch id, item ids in line order)."""
    content = jsonl([chat_line(f"req-{n}", f"question {n}") for n in range(lines)])
    with db.transaction() as session:
        file = files.new_file(owner=owner, filename="in.jsonl", purpose=files.BATCH, content=content)
        session.add(file)
        session.flush()
        batch = batches.create_batch(
            session,
            owner=owner,
            key_id=None,
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
            max_lines=lines,
        )
        ids = session.scalars(select(BatchItem.id).where(BatchItem.batch_id == batch.id).order_by(BatchItem.line))
        return batch.id, list(ids)


def counters(db: Database, batch_id: str) -> dict[str, int]:
    with db.transaction() as session:
        progress = session.get(BatchProgress, batch_id)
        assert progress is not None
        return {
            "total": progress.total,
            "finished": progress.finished,
            "completed": progress.completed,
            "failed": progress.failed,
        }


def counted_from_items(db: Database, batch_id: str) -> dict[str, int]:
    """The same figures counted from the items themselves."""
    with db.transaction() as session:
        by_status = dict(
            session.execute(
                select(BatchItem.status, func.count()).where(BatchItem.batch_id == batch_id).group_by(BatchItem.status)
            ).all()
        )
    return {
        "total": sum(by_status.values()),
        "finished": sum(count for status, count in by_status.items() if status != ItemStatus.PENDING),
        "completed": by_status.get(ItemStatus.SUCCEEDED, 0),
        "failed": by_status.get(ItemStatus.FAILED, 0),
    }


def autocommit(db: Database) -> Callable[[Callable[[Any], Any]], Any]:
    """Run one statement the way the worker does on PostgreSQL: its own connection, in autocommit."""
    engine = db.engine.execution_options(isolation_level="AUTOCOMMIT")

    def run(statement: Callable[[Any], Any]) -> Any:
        with engine.connect() as connection:
            return statement(connection)

    return run


def test_items_finishing_together_leave_exactly_one_writer_seeing_the_last(db: Database) -> None:
    batch_id, ids = new_batch(db, 60)
    run = autocommit(db)
    start = threading.Barrier(12, timeout=30)
    failing = set(ids[::3])  # 20 of the 60
    seen: list[batches.Progress | None] = []
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        start.wait()
        for item_id in mine:
            succeeded = item_id not in failing
            progress = run(lambda c, i=item_id, ok=succeeded: batches.record_result(c, item_id=i, succeeded=ok))
            # A duplicate delivery of the same item, racing the others: it must count nothing.
            duplicate = run(lambda c, i=item_id: batches.record_result(c, item_id=i, succeeded=False))
            with lock:
                seen.extend([progress, duplicate])

    threads = [threading.Thread(target=worker, args=(ids[n::12],)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    written = [progress for progress in seen if progress is not None]
    assert len(written) == 60 and seen.count(None) == 60  # each item counted once, every duplicate refused
    assert sorted(progress.finished for progress in written) == list(range(1, 61))  # no two saw the same count
    assert [progress.done for progress in written].count(True) == 1
    assert (
        counters(db, batch_id)
        == counted_from_items(db, batch_id)
        == {
            "total": 60,
            "finished": 60,
            "completed": 40,
            "failed": 20,
        }
    )
    with db.transaction() as session:
        assert batches.finalize_if_done(session, batch_id=batch_id) == "completed"
    with db.transaction() as session:
        assert batches.finalize_if_done(session, batch_id=batch_id) is None  # once


def test_cancelling_while_items_finish_keeps_the_counters_true_and_ends_the_batch_once(db: Database) -> None:
    """Cancellation (batch row, then items, then counters) against workers finishing items (item, then counters)
    and skipping queued ones: nobody deadlocks, nothing is counted twice, and the batch ends cancelled once."""
    batch_id, ids = new_batch(db, 40)
    run = autocommit(db)
    started = [item_id for item_id in ids[:20] if run(lambda c, i=item_id: batches.claim_item(c, item_id=i))]
    assert len(started) == 20
    finals: list[str | None] = []
    start = threading.Barrier(3, timeout=30)

    def finish_started() -> None:
        start.wait()
        for item_id in started:
            run(lambda c, i=item_id: batches.record_result(c, item_id=i, succeeded=True))
            with db.transaction() as session:
                finals.append(batches.finalize_if_done(session, batch_id=batch_id))

    def deliver_queued() -> None:  # messages of unstarted items, arriving as the cancel lands
        start.wait()
        for item_id in ids[20:]:
            with db.transaction() as session:
                _, work = batches.start_item(session, item_id=item_id)
            if work is not None:  # it beat the cancel: it runs to the end
                run(lambda c, i=item_id: batches.record_result(c, item_id=i, succeeded=True))

    def cancel() -> None:
        start.wait()
        with db.transaction() as session:
            batches.cancel_batch(session, owner="user-a", batch_id=batch_id)
        with db.transaction() as session:
            finals.append(batches.finalize_if_done(session, batch_id=batch_id))

    threads = [threading.Thread(target=work) for work in (finish_started, deliver_queued, cancel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    counted = counted_from_items(db, batch_id)
    assert counters(db, batch_id) == counted
    assert counted["finished"] == 40 and counted["completed"] >= 20  # every started item kept its result
    assert [final for final in finals if final is not None] == ["cancelled"]
    with db.transaction() as session:
        assert session.scalar(select(func.count()).where(File.purpose == files.BATCH_OUTPUT)) >= 1


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_every_way_out_of_pending_is_counted(db: Database) -> None:
    """Result, duplicate, dead letter, skip by a cancelled batch's worker, cancel, expiry: counters = items."""
    run_batch, run_ids = new_batch(db, 4)
    with db.transaction() as session:
        work = batches.claim_item(session, item_id=run_ids[0])
        assert work is not None and work.attempts == 1 and work.endpoint == "/v1/chat/completions"
        assert work.owner == "user-a" and work.body["messages"][0]["content"] == "question 0"
        assert batches.record_result(session, item_id=run_ids[0], succeeded=True, status_code=200, body={})
        assert batches.record_result(session, item_id=run_ids[0], succeeded=False) is None
        progress = batches.record_result(session, item_id=run_ids[1], succeeded=False, error={"code": "x"})
        assert progress == batches.Progress(run_batch, 2, 4) and not progress.done
    assert counters(db, run_batch) == counted_from_items(db, run_batch)

    cancelled, cancelled_ids = new_batch(db, 3)
    with db.transaction() as session:
        assert batches.start_item(session, item_id=cancelled_ids[0])[1] is not None
        batches.cancel_batch(session, owner="user-a", batch_id=cancelled)
    with db.transaction() as session:  # its redelivery after the cancel: skipped
        assert batches.start_item(session, item_id=cancelled_ids[0]) == (cancelled, None)
    assert (
        counters(db, cancelled)
        == counted_from_items(db, cancelled)
        == {
            "total": 3,
            "finished": 3,
            "completed": 0,
            "failed": 0,
        }
    )
    with db.transaction() as session:
        assert batches.progress(session, batch_id=cancelled) == batches.Progress(cancelled, 3, 3)
        assert batches.finalize_if_done(session, batch_id=cancelled) == "cancelled"

    with db.transaction() as session:
        assert batches.expire_due(session, now=utcnow() + timedelta(days=2)) == [run_batch]
    assert (
        counters(db, run_batch)
        == counted_from_items(db, run_batch)
        == {
            "total": 4,
            "finished": 4,
            "completed": 1,
            "failed": 1,
        }
    )
    with db.transaction() as session:
        assert batches.progress(session, batch_id="batch_unknown") is None
        assert batches.claim_item(session, item_id="batch_req_unknown") is None


def alembic_upgrade(url: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["url"] = url
    command.upgrade(config, revision)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_the_migration_counts_the_batches_already_there(backend: str, postgres: Any, tmp_path: Path) -> None:
    url = postgres.create_database("jobs_migration") if backend == "postgresql" else f"sqlite:///{tmp_path}/jobs.db"
    alembic_upgrade(url, "0003")
    engine = create_engine(url)
    statuses = ["pending", "succeeded", "succeeded", "failed", "skipped", "expired"]
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO batches (id, owner, endpoint, input_file_id, completion_window, status, total,"
                " input_tokens, cached_tokens, output_tokens, reasoning_tokens, created_at)"
                " VALUES ('batch_old', 'u', '/v1/chat/completions', 'file-x', '24h', 'in_progress', 6,"
                " 0, 0, 0, 0, :now)"
            ),
            {"now": utcnow()},
        )
        for line, status in enumerate(statuses):
            connection.execute(
                text(
                    "INSERT INTO batch_items (id, batch_id, line, custom_id, body, status, attempts)"
                    " VALUES (:id, 'batch_old', :line, :custom_id, '{}', :status, 0)"
                ),
                {"id": f"item-{line}", "line": line, "custom_id": f"c-{line}", "status": status},
            )
    engine.dispose()
    alembic_upgrade(url, "head")
    db = Database(url)
    try:
        assert counters(db, "batch_old") == {"total": 6, "finished": 5, "completed": 2, "failed": 1}
    finally:
        db.dispose()


class Recorder:
    """A publisher that records the item ids the relay publishes."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, _exchange: str, _queue: str, _type: str, data: dict[str, str], **_kwargs: Any) -> str:
        self.published.append(data["item_id"])
        return data["item_id"]

    def close(self) -> None:
        pass


def test_finished_items_bring_the_next_relay_pass_forward(db: Database) -> None:
    """With an hour between passes, a quarter of a window's items finishing is what tops the window up."""
    _batch_id, ids = new_batch(db, 12)
    publisher = Recorder()
    relay = Relay(db, publisher, queue="unused", interval=3600, window=8)  # type: ignore[arg-type]
    thread = relay.start_in_thread()
    try:
        assert eventually(lambda: len(publisher.published) >= 8)  # the first pass, at start
        run = autocommit(db)
        for item_id in ids[:2]:
            run(lambda c, i=item_id: batches.record_result(c, item_id=i, succeeded=True))
            relay.item_done()  # what the worker says after each item
        assert eventually(lambda: len(publisher.published) >= 10)
        assert publisher.published == ids[:10]  # the two free places, in line order
    finally:
        relay.stop()
        thread.join(30)
    assert not thread.is_alive()
