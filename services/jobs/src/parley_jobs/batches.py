"""Batches: creation (batch, items and outbox event in one transaction), progress, cancellation, item results
written once per item, and finalisation into output and error files exactly once.

Every move of an item out of `pending` moves its batch's `BatchProgress` counters in the same transaction (or the
same statement), so progress, `request_counts` and "was this the last item?" are one row read, never a count of the
items. Lock order, to keep clear of deadlocks: the batch row, then items, then the progress row.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    Connection,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    column,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from parley_kit import tracing
from parley_kit.db import utcnow
from parley_kit.errors import BadRequest, Conflict, NotFound
from parley_kit.ids import new_id

from . import files, outbox
from .jsonl import parse_batch_file
from .models import Batch, BatchItem, BatchProgress, BatchStatus, ItemStatus

DEFAULT_WINDOW_SECONDS = 24 * 3600.0  # OpenAI's only completion window, "24h"
FINISHED = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
STOPPING = (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
INSERT_CHUNK = 1000
# Core statements on the worker's hot path run on a plain connection or in a session; in a session, the ORM must not
# try to mirror them into loaded objects (there are none to keep in step).
CORE = {"synchronize_session": False}

Executor = Session | Connection


@dataclass(frozen=True, slots=True)
class Counts:
    """Live `request_counts` of a batch."""

    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class Progress:
    """A batch's finished items out of its total, as one item's write left them."""

    batch_id: str
    finished: int
    total: int

    @property
    def done(self) -> bool:
        """No item is pending any more."""
        return self.finished >= self.total


@dataclass(frozen=True, slots=True)
class ItemWork:
    """What a worker needs to run one item."""

    item_id: str
    batch_id: str
    custom_id: str
    endpoint: str
    body: dict[str, Any]
    owner: str
    key_id: str | None
    attempts: int


# The worker's statements, built once with bound parameters: building one per call (and its cache key) cost as much
# CPU as running it. `_CLAIM_WORK`, `_RECORD`: PostgreSQL; `_CLAIM_ITEM` + `_ROUTE`, `_FINISH_ITEM` + `_COUNT_RESULT`:
# the same in two statements, for SQLite.
_items = BatchItem.__table__.c
_claim = (
    update(BatchItem)
    .where(
        BatchItem.id == bindparam("p_item"),
        BatchItem.status == ItemStatus.PENDING,
        Batch.id == BatchItem.batch_id,
        *(Batch.status != status for status in STOPPING),  # not an IN list: that is expanded on every execution
    )
    .values(attempts=BatchItem.attempts + 1)
    .execution_options(**CORE)
)
_claimed = (BatchItem.batch_id, BatchItem.custom_id, BatchItem.body, BatchItem.attempts)
_route = (Batch.endpoint, Batch.owner, Batch.key_id)
_CLAIM_WORK = _claim.returning(*_claimed, *_route)
_CLAIM_ITEM = _claim.returning(*_claimed)
_ROUTE = select(*_route).where(Batch.id == bindparam("p_batch"))
_FINISH_ITEM = (
    update(BatchItem)
    .where(BatchItem.id == bindparam("p_item"), BatchItem.status == ItemStatus.PENDING)
    .values(
        status=bindparam("p_status", type_=_items.status.type),
        response_status=bindparam("p_code", type_=_items.response_status.type),
        request_id=bindparam("p_request", type_=_items.request_id.type),
        response_body=bindparam("p_body", type_=_items.response_body.type),
        error=bindparam("p_error", type_=_items.error.type),
        finished_at=bindparam("p_now", type_=_items.finished_at.type),
    )
    .returning(BatchItem.batch_id)
    .execution_options(**CORE)
)
_count_result = {
    "finished": BatchProgress.finished + 1,
    "completed": BatchProgress.completed + bindparam("p_completed", type_=Integer()),
    "failed": BatchProgress.failed + bindparam("p_failed", type_=Integer()),
}
_progressed = (BatchProgress.batch_id, BatchProgress.finished, BatchProgress.total)
_finished_item = _FINISH_ITEM.cte("finished_item")
_RECORD = (
    update(BatchProgress)
    .where(BatchProgress.batch_id == _finished_item.c.batch_id)
    .values(_count_result)
    .returning(*_progressed)
    .execution_options(**CORE)
)
_COUNT_RESULT = (
    update(BatchProgress)
    .where(BatchProgress.batch_id == bindparam("p_batch"))
    .values(_count_result)
    .returning(*_progressed)
    .execution_options(**CORE)
)
_PROGRESS = select(*_progressed).where(BatchProgress.batch_id == bindparam("p_batch"))
# A group's claim and results in one statement each (PostgreSQL): `_CLAIM_GROUP` is `_CLAIM_WORK` for an array of ids;
# `_RECORD_GROUP` writes every result given as a JSON array of rows, and counts them in their batches' progress.
_CLAIM_GROUP = (
    update(BatchItem)
    .where(
        BatchItem.id == any_(bindparam("p_items", type_=postgresql.ARRAY(String))),
        BatchItem.status == ItemStatus.PENDING,
        Batch.id == BatchItem.batch_id,
        *(Batch.status != status for status in STOPPING),
    )
    .values(attempts=BatchItem.attempts + 1)
    .returning(BatchItem.id, *_claimed, *_route)
    .execution_options(**CORE)
)
_results = (
    func.json_to_recordset(bindparam("p_rows", type_=JSON()))
    .table_valued(
        column("id", String),
        column("status", String),
        column("response_status", Integer),
        column("request_id", String),
        column("response_body", JSON),
        column("error", JSON),
    )
    .render_derived(name="results", with_types=True)
)
_finished_items = (
    update(BatchItem)
    .where(BatchItem.id == _results.c.id, BatchItem.status == ItemStatus.PENDING)
    .values(
        status=_results.c.status,
        response_status=_results.c.response_status,
        request_id=_results.c.request_id,
        response_body=_results.c.response_body,
        error=_results.c.error,
        finished_at=bindparam("p_now", type_=_items.finished_at.type),
    )
    .returning(BatchItem.batch_id, BatchItem.status)
    .cte("finished_items")
)
_per_batch = (
    select(
        _finished_items.c.batch_id,
        func.count().label("finished"),
        func.count().filter(_finished_items.c.status == ItemStatus.SUCCEEDED).label("completed"),
    )
    .group_by(_finished_items.c.batch_id)
    .subquery("per_batch")
)
_RECORD_GROUP = (
    update(BatchProgress)
    .where(BatchProgress.batch_id == _per_batch.c.batch_id)
    .values(
        finished=BatchProgress.finished + _per_batch.c.finished,
        completed=BatchProgress.completed + _per_batch.c.completed,
        failed=BatchProgress.failed + _per_batch.c.finished - _per_batch.c.completed,
    )
    .returning(*_progressed, _per_batch.c.finished, _per_batch.c.completed)
    .execution_options(**CORE)
)
# The API's reads of one batch (polled by clients while it runs).
_OWN_BATCH = select(Batch).where(Batch.id == bindparam("p_batch"), Batch.owner == bindparam("p_owner"))
_OWN_BATCH_LOCKED = _OWN_BATCH.with_for_update()
_counts = (BatchProgress.batch_id, BatchProgress.completed, BatchProgress.failed)
_COUNTS = select(*_counts).where(BatchProgress.batch_id == bindparam("p_batch"))


def request_hash(body: dict[str, Any]) -> str:
    """A stable hash of a creation request's body, to tell a retry from a different request under the same key."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def find_idempotent(session: Session, *, owner: str, idempotency_key: str, body_hash: str) -> Batch | None:
    """The batch an earlier request with this key created (None if none); 409 if that request had another body."""
    batch = session.scalars(
        select(Batch).where(Batch.owner == owner, Batch.idempotency_key == idempotency_key)
    ).one_or_none()
    if batch is not None and batch.request_hash != body_hash:
        raise Conflict(
            "This Idempotency-Key was already used with a different request body",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    return batch


def create_batch(
    session: Session,
    *,
    owner: str,
    key_id: str | None,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    max_lines: int,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    idempotency_key: str | None = None,
    body_hash: str | None = None,
) -> Batch:
    """Create the batch, one item per input line, and the `batch.created` event, in the caller's transaction.

    With an `idempotency_key`, a repeat of the same request returns the batch the first one created.
    """
    if idempotency_key is not None:
        existing = find_idempotent(session, owner=owner, idempotency_key=idempotency_key, body_hash=body_hash or "")
        if existing is not None:
            return existing
    file = files.get_file(session, owner=owner, file_id=input_file_id, with_content=True)
    if file.purpose != files.BATCH:
        raise BadRequest(
            f"file {input_file_id} has purpose {file.purpose!r}, not 'batch'",
            code="invalid_file",
            param="input_file_id",
        )
    lines = parse_batch_file(file.content, max_lines=max_lines)
    for line in lines:
        if line.url != endpoint:
            raise BadRequest(
                f"line {line.line}: url {line.url} does not match the batch endpoint {endpoint}",
                code="mismatched_endpoint",
                param="endpoint",
            )
    now = utcnow()
    batch = Batch(
        id=new_id("batch"),
        owner=owner,
        key_id=key_id,
        endpoint=endpoint,
        model=lines[0].body.get("model"),
        input_file_id=input_file_id,
        completion_window=completion_window,
        # The file was validated at upload (and again just now), so the batch starts running at once.
        status=BatchStatus.IN_PROGRESS,
        batch_metadata=metadata,
        errors=None,
        total=len(lines),
        created_at=now,
        in_progress_at=now,
        expires_at=now + timedelta(seconds=window_seconds),
        idempotency_key=idempotency_key,
        traceparent=tracing.outbound_headers().get("traceparent"),
        request_hash=body_hash if idempotency_key is not None else None,
    )
    try:
        with session.begin_nested():  # a concurrent request with the same key may win the unique constraint
            session.add(batch)
            session.flush()
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = find_idempotent(session, owner=owner, idempotency_key=idempotency_key, body_hash=body_hash or "")
        if existing is None:
            raise
        return existing
    rows = [
        {
            "id": new_id("batch_req"),
            "batch_id": batch.id,
            "line": line.line,
            "custom_id": line.custom_id,
            "body": line.body,
            "status": ItemStatus.PENDING,
            "attempts": 0,
        }
        for line in lines
    ]
    for start in range(0, len(rows), INSERT_CHUNK):
        session.execute(insert(BatchItem), rows[start : start + INSERT_CHUNK])
    session.execute(insert(BatchProgress).values(batch_id=batch.id, total=len(rows), finished=0, completed=0, failed=0))
    outbox.add_event(session, event_type=outbox.BATCH_CREATED, payload={"batch_id": batch.id})
    session.flush()
    return batch


def get_batch(session: Session, *, owner: str, batch_id: str, lock: bool = False) -> Batch:
    """The caller's batch, or 404 (another user's batch is not revealed)."""
    query = _OWN_BATCH_LOCKED if lock else _OWN_BATCH
    batch = session.scalars(query, {"p_batch": batch_id, "p_owner": owner}).one_or_none()
    if batch is None:
        raise NotFound("No such Batch object.", code="batch_not_found", param="batch_id")  # no echo: may be a secret
    return batch


def list_batches(session: Session, *, owner: str, limit: int, after: str | None) -> tuple[list[Batch], bool]:
    """A page of the caller's batches, newest first, after the cursor; and whether more follow."""
    query = select(Batch).where(Batch.owner == owner)
    if after:
        cursor = session.scalars(select(Batch).where(Batch.id == after, Batch.owner == owner)).one_or_none()
        if cursor is None:
            raise BadRequest(f"after: no such batch {after}", code="invalid_cursor", param="after")
        query = query.where(
            or_(Batch.created_at < cursor.created_at, and_(Batch.created_at == cursor.created_at, Batch.id < cursor.id))
        )
    rows = list(session.scalars(query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def request_counts(session: Session, batches: list[Batch]) -> dict[str, Counts]:
    """Live counts for several batches in one query (their progress rows)."""
    ids = [batch.id for batch in batches]
    counts: dict[str, tuple[int, int]] = {}
    if len(ids) == 1:  # every poll of one batch: a statement built once
        counts = {
            batch_id: (completed, failed)
            for batch_id, completed, failed in session.execute(_COUNTS, {"p_batch": ids[0]})
        }
    elif ids:
        query = select(*_counts).where(BatchProgress.batch_id.in_(ids))
        counts = {batch_id: (completed, failed) for batch_id, completed, failed in session.execute(query)}
    return {
        batch.id: Counts(
            total=batch.total, completed=counts.get(batch.id, (0, 0))[0], failed=counts.get(batch.id, (0, 0))[1]
        )
        for batch in batches
    }


def cancel_batch(session: Session, *, owner: str, batch_id: str) -> Batch:
    """Stop a batch: items no worker has started are skipped; it is cancelled once the started ones finish."""
    batch = get_batch(session, owner=owner, batch_id=batch_id, lock=True)
    if batch.status in STOPPING:
        return batch
    if batch.status in FINISHED or batch.status == BatchStatus.FINALIZING:
        raise Conflict(f"Cannot cancel a batch with status {batch.status!r}", code="batch_not_cancellable")
    now = utcnow()
    batch.status = BatchStatus.CANCELLING
    batch.cancelling_at = now
    # A started item (attempts > 0) is left to its worker; row locks order this against `claim_item`'s UPDATE.
    skipped = session.execute(
        update(BatchItem)
        .where(BatchItem.batch_id == batch.id, BatchItem.status == ItemStatus.PENDING, BatchItem.attempts == 0)
        .values(status=ItemStatus.SKIPPED, finished_at=now)
        .execution_options(**CORE)
    )
    _count_finished(session, batch_id=batch.id, finished=skipped.rowcount)  # type: ignore[attr-defined]
    session.flush()
    return batch


def claim_item(session: Executor, *, item_id: str) -> ItemWork | None:
    """Count an attempt at a pending item whose batch is not being cancelled, and return its work. None when there
    is nothing to run (`start_item` says why). On PostgreSQL one statement (autocommit-safe); elsewhere two, so run
    it in a transaction there.

    Counting the attempt marks the item started, so a cancel arriving now leaves it to this worker.
    """
    params = {"p_item": item_id}
    if _dialect(session) == "postgresql":
        row = session.execute(_CLAIM_WORK, params).one_or_none()
    else:  # SQLite's RETURNING sees only the updated table
        claimed = session.execute(_CLAIM_ITEM, params).one_or_none()
        row = None
        if claimed is not None:
            row = (*claimed, *session.execute(_ROUTE, {"p_batch": claimed[0]}).one())
    if row is None:
        return None
    batch_id, custom_id, body, attempts, endpoint, owner, key_id = row
    return ItemWork(
        item_id=item_id,
        batch_id=batch_id,
        custom_id=custom_id,
        endpoint=endpoint,
        body=body,
        owner=owner,
        key_id=key_id,
        attempts=attempts,
    )


def claim_items(session: Executor, *, item_ids: list[str]) -> list[ItemWork]:
    """`claim_item` for a group: the work of the items claimed (the others have nothing to run: `start_item` says
    why). On PostgreSQL one statement (autocommit-safe); elsewhere two per item, so run it in a transaction there."""
    if _dialect(session) != "postgresql":
        return [work for item_id in item_ids if (work := claim_item(session, item_id=item_id)) is not None]
    return [
        ItemWork(item_id, batch_id, custom_id, endpoint, body, owner, key_id, attempts)
        for item_id, batch_id, custom_id, body, attempts, endpoint, owner, key_id in session.execute(
            _CLAIM_GROUP, {"p_items": item_ids}
        )
    ]


def start_item(session: Executor, *, item_id: str) -> tuple[str | None, ItemWork | None]:
    """Claim an attempt at an item: (its batch id, the work), with no work when there is nothing to run
    (already finished, or its batch is being cancelled, in which case the item is skipped). Several statements:
    run it in a transaction."""
    work = claim_item(session, item_id=item_id)
    if work is not None:
        return work.batch_id, work
    row = session.execute(
        select(BatchItem.batch_id, BatchItem.status, Batch.status)
        .join(Batch, Batch.id == BatchItem.batch_id)
        .where(BatchItem.id == item_id)
    ).one_or_none()
    if row is None:
        return None, None
    batch_id, item_status, batch_status = row
    if item_status != ItemStatus.PENDING:
        return batch_id, None
    if batch_status in STOPPING:
        skipped = session.execute(
            update(BatchItem)
            .where(BatchItem.id == item_id, BatchItem.status == ItemStatus.PENDING)
            .values(status=ItemStatus.SKIPPED, finished_at=utcnow())
            .execution_options(**CORE)
        )
        _count_finished(session, batch_id=batch_id, finished=skipped.rowcount)  # type: ignore[attr-defined]
        return batch_id, None
    # Pending in a running batch: statuses only move forward, so the claim missed nothing; claim it again.
    return batch_id, claim_item(session, item_id=item_id)


def item_batch_id(session: Executor, *, item_id: str) -> str | None:
    """The batch an item belongs to (None for an unknown item)."""
    return session.scalar(select(BatchItem.batch_id).where(BatchItem.id == item_id))


def record_result(
    session: Executor,
    *,
    item_id: str,
    succeeded: bool,
    status_code: int | None = None,
    request_id: str | None = None,
    body: Any = None,
    error: dict[str, Any] | None = None,
) -> Progress | None:
    """Write an item's outcome once and count it in its batch's progress: the progress it left (the caller that sees
    `done` wrote the last item), or None when a second delivery of the same item found it finished already.

    On PostgreSQL one statement (item and counters together, autocommit-safe); elsewhere two, so run it in a
    transaction there.
    """
    params = {
        "p_item": item_id,
        "p_status": ItemStatus.SUCCEEDED if succeeded else ItemStatus.FAILED,
        "p_code": status_code,
        "p_request": request_id,
        "p_body": body,
        "p_error": error,
        "p_now": utcnow(),
        "p_completed": 1 if succeeded else 0,
        "p_failed": 0 if succeeded else 1,
    }
    if _dialect(session) == "postgresql":
        row = session.execute(_RECORD, params).one_or_none()
    else:
        batch_id = session.execute(_FINISH_ITEM, params).scalar_one_or_none()
        if batch_id is None:
            return None
        row = session.execute(_COUNT_RESULT, params | {"p_batch": batch_id}).one_or_none()
    return Progress(*row) if row is not None else None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one item: its result, written once (`record_results`)."""

    succeeded: bool
    status_code: int | None = None
    request_id: str | None = None
    body: Any = None
    error: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """What writing a group's results did to one batch: its progress after them, and how many of them it counted
    (results of items already finished by an earlier delivery are not)."""

    progress: Progress
    completed: int
    failed: int


def record_results(session: Executor, results: list[tuple[str, Outcome]]) -> list[Recorded]:
    """`record_result` for a group of (item id, outcome): each item's outcome written once, and counted in its batch's
    progress.

    On PostgreSQL one statement whatever the group's size (autocommit-safe); elsewhere two per item, so run it in a
    transaction there.
    """
    if _dialect(session) != "postgresql":
        recorded: dict[str, Recorded] = {}
        for item_id, outcome in results:
            progress = record_result(
                session,
                item_id=item_id,
                succeeded=outcome.succeeded,
                status_code=outcome.status_code,
                request_id=outcome.request_id,
                body=outcome.body,
                error=outcome.error,
            )
            if progress is not None:
                counted = recorded.get(progress.batch_id, Recorded(progress, 0, 0))
                recorded[progress.batch_id] = Recorded(
                    progress, counted.completed + outcome.succeeded, counted.failed + (not outcome.succeeded)
                )
        return list(recorded.values())
    rows = [
        {
            "id": item_id,
            "status": ItemStatus.SUCCEEDED if outcome.succeeded else ItemStatus.FAILED,
            "response_status": outcome.status_code,
            "request_id": outcome.request_id,
            "response_body": outcome.body,
            "error": outcome.error,
        }
        for item_id, outcome in results
    ]
    return [
        Recorded(Progress(batch_id, finished, total), completed, counted - completed)
        for batch_id, finished, total, counted, completed in session.execute(
            _RECORD_GROUP, {"p_rows": rows, "p_now": utcnow()}
        )
    ]


def progress(session: Executor, *, batch_id: str) -> Progress | None:
    """A batch's finished and total items (None for an unknown batch)."""
    row = session.execute(_PROGRESS, {"p_batch": batch_id}).one_or_none()
    return Progress(*row) if row is not None else None


def finalize_if_done(session: Session, *, batch_id: str) -> str | None:
    """When no item is pending, write the output and error files and end the batch; exactly once.

    Call it in a transaction of its own, after the item's result committed: the counters then include every
    committed item. The conditional UPDATE on the status is the guard: of several callers only one moves the batch on.
    """
    current = progress(session, batch_id=batch_id)
    if current is None or not current.done:
        return None
    now = utcnow()
    status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
    if status == BatchStatus.IN_PROGRESS:
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.IN_PROGRESS)
            .values(status=BatchStatus.FINALIZING, finalizing_at=now)
        )
        final = BatchStatus.COMPLETED
    elif status == BatchStatus.CANCELLING:
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.CANCELLING)
            .values(status=BatchStatus.FINALIZING)
        )
        final = BatchStatus.CANCELLED
    else:
        return None
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return None
    batch = session.get(Batch, batch_id, populate_existing=True)
    assert batch is not None
    _write_result_files(session, batch)
    batch.status = final
    if final == BatchStatus.COMPLETED:
        batch.completed_at = now
    else:
        batch.cancelled_at = now
    session.flush()
    return final


def expire_due(session: Session, *, now: datetime) -> list[str]:
    """End every running batch whose completion window has passed: unfinished lines go to the error file as
    `batch_expired`, finished ones stay in the output file; returns the expired batch ids."""
    due = session.scalars(
        select(Batch.id).where(Batch.status == BatchStatus.IN_PROGRESS, Batch.expires_at <= now).order_by(Batch.id)
    ).all()
    expired = []
    for batch_id in due:
        # The same guard as finalize_if_done: of several sweepers (and a finishing worker) only one moves it on.
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status == BatchStatus.IN_PROGRESS)
            .values(status=BatchStatus.FINALIZING, finalizing_at=now)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        ended = session.execute(
            update(BatchItem)
            .where(BatchItem.batch_id == batch_id, BatchItem.status == ItemStatus.PENDING)
            .values(status=ItemStatus.EXPIRED, finished_at=now)
            .execution_options(**CORE)
        )
        _count_finished(session, batch_id=batch_id, finished=ended.rowcount)  # type: ignore[attr-defined]
        batch = session.get(Batch, batch_id, populate_existing=True)
        assert batch is not None
        _write_result_files(session, batch)
        batch.status = BatchStatus.EXPIRED
        batch.expired_at = now
        session.flush()
        expired.append(batch_id)
    return expired


def traceparents(session: Session, item_ids: list[str]) -> dict[str, str | None]:
    """item id → the traceparent of the request that created its batch."""
    traces: dict[str, str | None] = {}
    for start in range(0, len(item_ids), INSERT_CHUNK):
        query = (
            select(BatchItem.id, Batch.traceparent)
            .join(Batch, Batch.id == BatchItem.batch_id)
            .where(BatchItem.id.in_(item_ids[start : start + INSERT_CHUNK]))
        )
        traces.update({item_id: trace for item_id, trace in session.execute(query)})
    return traces


def schedule(session: Session, *, window: int, group: int = 1) -> list[list[str]]:
    """Item ids to publish now, in groups of at most `group` items of one batch (a message and an llm request each):
    each owner may have at most `window` items queued but unfinished, topped up as they finish, and the owners'
    groups are interleaved, so a huge batch cannot starve anyone else's.

    Running batches are locked with SKIP LOCKED (PostgreSQL) until the caller commits, so concurrent relays top up
    different batches. The caller publishes the ids, then stamps them (`mark_queued`) and commits: a failed publish
    leaves the items unqueued, and (on PostgreSQL) the item rows stay unlocked while messages go out, so a worker
    handed one of them claims it at once instead of waiting for this transaction.
    """
    running = session.execute(
        select(Batch.id, Batch.owner)
        .where(Batch.status == BatchStatus.IN_PROGRESS)
        .order_by(Batch.created_at, Batch.id)
        .with_for_update(skip_locked=True)
    ).all()
    if not running:
        return []
    batches_of: dict[str, list[str]] = defaultdict(list)
    for batch_id, owner in running:
        batches_of[owner].append(batch_id)
    in_flight = dict(
        session.execute(
            select(Batch.owner, func.count())
            .select_from(BatchItem)
            .join(Batch, Batch.id == BatchItem.batch_id)
            .where(
                Batch.status == BatchStatus.IN_PROGRESS,
                BatchItem.status == ItemStatus.PENDING,
                BatchItem.queued_at.is_not(None),
            )
            .group_by(Batch.owner)
        ).all()
    )
    per_owner: list[list[list[str]]] = []  # each owner's groups
    for owner, batch_ids in batches_of.items():
        room = window - in_flight.get(owner, 0)
        groups: list[list[str]] = []
        for batch_id in batch_ids:  # oldest first; each read in line order off ix_batch_items_batch_queued
            if room <= 0:
                break
            ids = session.scalars(
                select(BatchItem.id)
                .where(
                    BatchItem.batch_id == batch_id,
                    BatchItem.status == ItemStatus.PENDING,
                    BatchItem.queued_at.is_(None),
                )
                .order_by(BatchItem.line)
                .limit(room)
            ).all()
            room -= len(ids)
            groups += [list(ids[start : start + group]) for start in range(0, len(ids), group)]
        if groups:
            per_owner.append(groups)
    return [groups[i] for i in range(max(map(len, per_owner), default=0)) for groups in per_owner if i < len(groups)]


def mark_queued(session: Session, item_ids: list[str], *, now: datetime) -> None:
    """Stamp published items queued: they count in their owner's window from the commit on."""
    for start in range(0, len(item_ids), INSERT_CHUNK):
        session.execute(
            update(BatchItem).where(BatchItem.id.in_(item_ids[start : start + INSERT_CHUNK])).values(queued_at=now)
        )


def oldest_pending_age(session: Session, *, now: datetime) -> float:
    """Seconds since the oldest running batch with unfinished lines was created (0 when none)."""
    oldest = session.scalar(
        select(func.min(Batch.created_at)).where(
            Batch.status == BatchStatus.IN_PROGRESS,
            select(BatchItem.id).where(BatchItem.batch_id == Batch.id, BatchItem.status == ItemStatus.PENDING).exists(),
        )
    )
    return max((now - outbox.aware_utc(oldest)).total_seconds(), 0.0) if oldest else 0.0


def _dialect(session: Executor) -> str:
    bind = session.get_bind() if isinstance(session, Session) else session
    return bind.dialect.name


def _count_finished(session: Executor, *, batch_id: str, finished: int) -> None:
    """Count items that left `pending` without a result (skipped, expired) in the batch's progress."""
    if finished > 0:
        session.execute(
            update(BatchProgress)
            .where(BatchProgress.batch_id == batch_id)
            .values(finished=BatchProgress.finished + finished)
            .execution_options(**CORE)
        )


def output_line(item: BatchItem) -> dict[str, Any]:
    """An item as OpenAI's `BatchRequestOutput` line."""
    response = None
    if item.response_status is not None:
        response = {"status_code": item.response_status, "request_id": item.request_id, "body": item.response_body}
    error = item.error
    if item.status == ItemStatus.SKIPPED:
        error = {"code": "batch_cancelled", "message": "The batch was cancelled before this request ran."}
    elif item.status == ItemStatus.EXPIRED:
        error = {"code": "batch_expired", "message": "The completion window ended before this request ran."}
    return {"id": item.id, "custom_id": item.custom_id, "response": response, "error": error}


def _write_result_files(session: Session, batch: Batch) -> None:
    """Stream the items into the output (succeeded) and error (failed, skipped) files and sum the usage."""
    output, errors = io.BytesIO(), io.BytesIO()
    usage = {"input_tokens": 0, "cached_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0}
    items = session.scalars(
        select(BatchItem)
        .where(BatchItem.batch_id == batch.id)
        .order_by(BatchItem.line)
        .execution_options(yield_per=500)
    )
    for item in items:
        target = output if item.status == ItemStatus.SUCCEEDED else errors
        target.write(orjson.dumps(output_line(item)) + b"\n")
        if item.status == ItemStatus.SUCCEEDED:
            _add_usage(usage, item.response_body)
    for buffer, suffix, attribute in ((output, "output", "output_file_id"), (errors, "error", "error_file_id")):
        content = buffer.getvalue()
        if content:
            file = files.new_file(
                owner=batch.owner, filename=f"{batch.id}_{suffix}.jsonl", purpose=files.BATCH_OUTPUT, content=content
            )
            session.add(file)
            setattr(batch, attribute, file.id)
    batch.input_tokens = usage["input_tokens"]
    batch.cached_tokens = usage["cached_tokens"]
    batch.output_tokens = usage["output_tokens"]
    batch.reasoning_tokens = usage["reasoning_tokens"]


def _number(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _add_usage(totals: dict[str, int], body: Any) -> None:
    """Add one response's usage, in whichever of the OpenAI or Anthropic shapes it came."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return
    if "input_tokens" in usage:  # Anthropic Messages
        totals["input_tokens"] += _number(usage.get("input_tokens")) + _number(usage.get("cache_read_input_tokens"))
        totals["cached_tokens"] += _number(usage.get("cache_read_input_tokens"))
        totals["output_tokens"] += _number(usage.get("output_tokens"))
        return
    totals["input_tokens"] += _number(usage.get("prompt_tokens"))
    totals["output_tokens"] += _number(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    if isinstance(prompt_details, dict):
        totals["cached_tokens"] += _number(prompt_details.get("cached_tokens"))
    completion_details = usage.get("completion_tokens_details")
    if isinstance(completion_details, dict):
        totals["reasoning_tokens"] += _number(completion_details.get("reasoning_tokens"))
