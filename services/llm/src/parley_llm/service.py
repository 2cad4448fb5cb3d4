"""Ledger functions: price a call, write its usage row, and aggregate a caller's usage (never committing)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, Connection, Date, bindparam, cast, column, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from parley_kit.db import UTCDateTime, utcnow

from .catalog import Deployment
from .models import UsageRecord, usage_records

# INSERT … ON CONFLICT (call_id) DO NOTHING, per dialect: a retried settlement writes its row once. With RETURNING
# for a lone row (did it write?); without, for many on SQLite (an executemany).
_INSERT_MANY_ONCE = {
    dialect: module.insert(usage_records).on_conflict_do_nothing(index_elements=["call_id"])
    for dialect, module in (("postgresql", postgresql), ("sqlite", sqlite))
}
_INSERT_ONCE = {dialect: insert.returning(usage_records.c.id) for dialect, insert in _INSERT_MANY_ONCE.items()}
# Many rows on PostgreSQL: one statement over one JSON parameter, one round trip whatever the count. psycopg's
# executemany pipelines a Bind/Execute per row and waits on the socket many times a batch: in a saturated gevent
# worker each wait is a turn behind every busy connection, and a caller helping a lagging writer (batching.py) was
# held for seconds (bench/README.md, session 13).
_USAGE_COLUMNS = [c for c in usage_records.c if not c.primary_key]
_CREATED_AT = UTCDateTime()
_ROWS = (
    func.json_to_recordset(bindparam("p_rows", type_=JSON()))
    .table_valued(*(column(c.name, c.type) for c in _USAGE_COLUMNS))
    .render_derived(name="rows", with_types=True)
)
_INSERT_ROWS_ONCE = (
    postgresql.insert(usage_records)
    .from_select([c.name for c in _USAGE_COLUMNS], select(*_ROWS.c))
    .on_conflict_do_nothing(index_elements=["call_id"])
)


def price(deployment: Deployment, *, input_tokens: int, output_tokens: int) -> Decimal:
    """The USD cost of a call at the deployment's current price, rounded to the ledger's 9 decimals."""
    return deployment.cost(input_tokens, output_tokens).quantize(Decimal("1e-9"))


def usage_row(
    *,
    call_id: str,
    request_id: str,
    user_id: str,
    key_id: str | None,
    operation: str,
    deployment: Deployment,
    input_tokens: int,
    output_tokens: int,
    cost_usd: Decimal,
    latency_ms: int,
    status: str,
    price_version: str,
) -> dict[str, Any]:
    """One call's usage row, as the ledger table stores it."""
    return {
        "call_id": call_id,
        "request_id": request_id,
        "user_id": user_id,
        "key_id": key_id,
        "operation": operation,
        "model": deployment.name,
        "provider": deployment.provider.value,
        "upstream_model": deployment.upstream_model,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cost_usd": cost_usd,
        "latency_ms": latency_ms,
        "status": status,
        "price_version": price_version,
        "created_at": utcnow(),
    }


def record_usage(connection: Connection, row: dict[str, Any]) -> bool:
    """Write one call's usage row with a single Core INSERT (no ORM unit of work on the hot path); False when the
    call's row is already there (an earlier attempt committed)."""
    return connection.execute(_INSERT_ONCE[connection.dialect.name], row).first() is not None


def _utc_text(value: datetime) -> str:
    """A timestamp as the JSON text of a UTC instant, refused when naive (as the column type refuses it)."""
    bound = _CREATED_AT.process_bind_param(value, None)
    assert bound is not None
    return bound.isoformat()


def record_usages(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Write many calls' usage rows in one statement (PostgreSQL) or one executemany (SQLite); a row whose call is
    already there is skipped."""
    if connection.dialect.name != "postgresql":
        connection.execute(_INSERT_MANY_ONCE[connection.dialect.name], rows)
        return
    as_json = [{**row, "cost_usd": str(row["cost_usd"]), "created_at": _utc_text(row["created_at"])} for row in rows]
    connection.execute(_INSERT_ROWS_ONCE, {"p_rows": as_json})


def usage_by_day(
    session: Session,
    *,
    user_id: str | None,
    start: date | None = None,
    end: date | None = None,
    by_user: bool = False,
) -> list[dict]:
    """Usage per UTC day and model (and user, for the admin aggregate), oldest first; one user's or everyone's."""
    created = UsageRecord.created_at
    if session.get_bind().dialect.name == "postgresql":
        day: Any = cast(func.timezone("UTC", created), Date)
    else:  # SQLite stores UTC text; date() takes its first ten characters
        day = func.date(created)
    day = day.label("day")
    keys: list[Any] = [day, UsageRecord.user_id, UsageRecord.model] if by_user else [day, UsageRecord.model]
    query = (
        select(
            *keys,
            func.count().label("requests"),
            func.coalesce(func.sum(UsageRecord.input_tokens), 0).label("input_tokens"),
            func.coalesce(func.sum(UsageRecord.output_tokens), 0).label("output_tokens"),
            func.coalesce(func.sum(UsageRecord.cost_usd), 0).label("cost_usd"),
        )
        .group_by(*keys)
        .order_by(*keys)
    )
    if user_id is not None:
        query = query.where(UsageRecord.user_id == user_id)
    if start is not None:
        query = query.where(created >= datetime.combine(start, time.min, UTC))
    if end is not None:
        query = query.where(created < datetime.combine(end + timedelta(days=1), time.min, UTC))
    rows = []
    for row in session.execute(query):
        item: dict[str, Any] = {"date": row.day.isoformat() if isinstance(row.day, date) else str(row.day)}
        if by_user:
            item["user_id"] = row.user_id
        item.update(
            model=row.model,
            requests=int(row.requests),
            input_tokens=int(row.input_tokens),
            output_tokens=int(row.output_tokens),
            cost_usd=float(Decimal(str(row.cost_usd))),
        )
        rows.append(item)
    return rows
