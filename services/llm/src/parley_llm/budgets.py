"""Budgets: USD limits per user and per API key, enforced atomically by reserve → settle → refund.

The check and the reservation are one UPDATE (`… WHERE spent + reserved + estimate <= limit`), so concurrent
requests can never reserve past a limit on PostgreSQL (row lock, re-checked predicate) or SQLite (one writer).
A new period starts inside the same statement: spent counts as 0 when the stored period_start is older.
Amounts are integer nano-USD (the ledger's 9 decimals) so sums are exact on both databases.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from enum import StrEnum
from typing import Any

from prometheus_client import Gauge
from sqlalchemy import Connection, Engine, and_, bindparam, case, exists, select, update
from sqlalchemy.orm import Session

from parley_kit.db import UTCDateTime, retry_lost_connection, utcnow
from parley_kit.errors import BudgetExceeded

from .models import Budget, budgets

NANO = Decimal(1_000_000_000)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# No per-user label (unbounded cardinality): the smallest remaining amount among the budgets a call just settled,
# as last seen by the live workers.
BUDGET_REMAINING = Gauge(
    "parley_budget_remaining_usd",
    "Smallest remaining USD among the budgets touched by the latest settled call.",
    multiprocess_mode="livemin",
)


class Scope(StrEnum):
    """Whose budget."""

    USER = "user"
    KEY = "key"


class Period(StrEnum):
    """When spending starts again from zero."""

    DAY = "day"
    MONTH = "month"
    TOTAL = "total"


def to_nano(usd: Decimal) -> int:
    """USD → integer nano-USD, rounded up (a reservation never underestimates by rounding)."""
    return int((usd * NANO).to_integral_value(rounding=ROUND_CEILING))


def to_usd(nano: int) -> float:
    """Integer nano-USD → USD for JSON."""
    return float(Decimal(nano) / NANO)


def period_starts(now: datetime) -> dict[str, datetime]:
    """The start of the current day, month and all time (UTC)."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return {"day": day, "month": day.replace(day=1), "total": EPOCH}


def _current_start() -> Any:
    """SQL: the current period's start for the row's period (bound per statement)."""
    return case(
        (budgets.c.period == "day", bindparam("day_start", type_=UTCDateTime())),
        (budgets.c.period == "month", bindparam("month_start", type_=UTCDateTime())),
        else_=bindparam("total_start", type_=UTCDateTime()),
    )


def _spent_now() -> Any:
    """SQL: spent in the current period (0 when the stored period is over)."""
    return case((budgets.c.period_start < _current_start(), 0), else_=budgets.c.spent_nusd)


_RESERVE = (
    update(budgets)
    .where(
        budgets.c.scope == bindparam("b_scope"),
        budgets.c.subject_id == bindparam("b_subject"),
        _spent_now() + budgets.c.reserved_nusd + bindparam("estimate") <= budgets.c.limit_nusd,
    )
    .values(
        spent_nusd=_spent_now(),
        period_start=_current_start(),
        reserved_nusd=budgets.c.reserved_nusd + bindparam("estimate"),
        updated_at=bindparam("now", type_=UTCDateTime()),
    )
)
_SETTLE = (
    update(budgets)
    .where(budgets.c.scope == bindparam("b_scope"), budgets.c.subject_id == bindparam("b_subject"))
    .values(
        reserved_nusd=budgets.c.reserved_nusd - bindparam("estimate"),
        spent_nusd=budgets.c.spent_nusd + bindparam("cost"),
        updated_at=bindparam("now", type_=UTCDateTime()),
    )
    .returning(budgets.c.limit_nusd - budgets.c.spent_nusd - budgets.c.reserved_nusd)
)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one call holds: the estimate on each budget it touched."""

    subjects: tuple[tuple[str, str], ...]
    estimate_nusd: int


class BudgetDirectory:
    """Who has a budget, cached per process for `ttl` seconds so callers without one cost no extra round trip.

    With ttl 0 every call tries the reserving UPDATE for its user and key (a no-op when there is no budget).
    """

    def __init__(self, engine: Engine, ttl: float) -> None:
        self.engine = engine
        self.ttl = ttl
        self._lock = threading.Lock()
        self._subjects: frozenset[tuple[str, str]] = frozenset()
        self._loaded_at = float("-inf")

    def invalidate(self) -> None:
        """Forget the cache (this process just changed a budget)."""
        self._loaded_at = float("-inf")

    def subjects_for(self, user_id: str, key_id: str | None) -> tuple[tuple[str, str], ...]:
        """The (scope, subject) budgets that may apply to this caller."""
        wanted = [(Scope.USER.value, user_id)] + ([(Scope.KEY.value, key_id)] if key_id else [])
        if self.ttl <= 0:
            return tuple(wanted)
        if time.monotonic() - self._loaded_at > self.ttl:
            with self._lock:
                if time.monotonic() - self._loaded_at > self.ttl:
                    self._subjects = retry_lost_connection(self._load)
                    self._loaded_at = time.monotonic()
        return tuple(s for s in wanted if s in self._subjects)

    def _load(self) -> frozenset[tuple[str, str]]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(budgets.c.scope, budgets.c.subject_id))
            return frozenset((r.scope, r.subject_id) for r in rows)


def reserve(
    connection: Connection, *, subjects: Iterable[tuple[str, str]], estimate_nusd: int, now: datetime
) -> Reservation | None:
    """Reserve the estimate on every budget of the caller, or raise BudgetExceeded (the caller rolls back)."""
    reserved = []
    starts = period_starts(now)
    for scope, subject in subjects:
        params = {
            "b_scope": scope,
            "b_subject": subject,
            "estimate": estimate_nusd,
            "now": now,
            "day_start": starts["day"],
            "month_start": starts["month"],
            "total_start": starts["total"],
        }
        if connection.execute(_RESERVE, params).rowcount == 1:
            reserved.append((scope, subject))
            continue
        found = connection.execute(
            select(exists().where(and_(budgets.c.scope == scope, budgets.c.subject_id == subject)))
        ).scalar()
        if found:
            whose = "your" if scope == Scope.USER else "this API key's"
            raise BudgetExceeded(f"{whose} budget does not cover this request", code="insufficient_quota")
    return Reservation(tuple(reserved), estimate_nusd) if reserved else None


def settle(connection: Connection, reservation: Reservation, *, cost_nusd: int, now: datetime) -> None:
    """Turn a reservation into spending: release the estimate, add the actual cost (0 on error: a refund)."""
    remaining = []
    for scope, subject in reservation.subjects:
        params = {
            "b_scope": scope,
            "b_subject": subject,
            "estimate": reservation.estimate_nusd,
            "cost": cost_nusd,
            "now": now,
        }
        remaining.extend(row[0] for row in connection.execute(_SETTLE, params))
    if remaining:
        BUDGET_REMAINING.set(to_usd(min(remaining)))


def put_budget(session: Session, *, scope: Scope, subject_id: str, limit_usd: Decimal, period: Period) -> Budget:
    """Create or change a budget; changing the period starts a new one (spent counts from now)."""
    now = utcnow()
    budget = session.scalars(select(Budget).where(Budget.scope == scope, Budget.subject_id == subject_id)).first()
    if budget is None:
        budget = Budget(
            scope=scope.value,
            subject_id=subject_id,
            period=period.value,
            limit_nusd=to_nano(limit_usd),
            spent_nusd=0,
            reserved_nusd=0,
            period_start=period_starts(now)[period.value],
            updated_at=now,
        )
        session.add(budget)
        session.flush()
        return budget
    if budget.period != period.value:
        budget.period, budget.spent_nusd = period.value, 0
        budget.period_start = period_starts(now)[period.value]
    budget.limit_nusd = to_nano(limit_usd)
    budget.updated_at = now
    session.flush()
    return budget


def get_budget(session: Session, *, scope: Scope, subject_id: str) -> Budget | None:
    """One budget, if set."""
    return session.scalars(select(Budget).where(Budget.scope == scope, Budget.subject_id == subject_id)).first()


def list_budgets(session: Session, *, scope: Scope | None = None) -> list[Budget]:
    """Every budget (of one scope), by scope and subject."""
    query = select(Budget).order_by(Budget.scope, Budget.subject_id)
    if scope is not None:
        query = query.where(Budget.scope == scope)
    return list(session.scalars(query))


def delete_budget(session: Session, *, scope: Scope, subject_id: str) -> bool:
    """Remove a budget; whether there was one."""
    budget = get_budget(session, scope=scope, subject_id=subject_id)
    if budget is not None:
        session.delete(budget)
    return budget is not None


def describe(budget: Budget, now: datetime | None = None) -> dict[str, Any]:
    """The API view of a budget (spent reads 0 once its period is over, as the next reservation will see it)."""
    start = period_starts(now or utcnow())[budget.period]
    spent = 0 if budget.period_start < start else budget.spent_nusd
    return {
        "scope": budget.scope,
        "subject_id": budget.subject_id,
        "period": budget.period,
        "limit_usd": to_usd(budget.limit_nusd),
        "spent_usd": to_usd(spent),
        "reserved_usd": to_usd(budget.reserved_nusd),
        "remaining_usd": to_usd(budget.limit_nusd - spent - budget.reserved_nusd),
        "period_start": (budget.period_start if budget.period_start >= start else start).isoformat(),
    }
