"""The transactional outbox: events are written with the change they announce and published by the relay."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from parley_kit.db import utcnow
from parley_kit.ids import new_id

from .models import OutboxEvent

BATCH_CREATED = "batch.created"


def add_event(session: Session, *, event_type: str, payload: dict[str, Any]) -> OutboxEvent:
    """Record an event in the caller's transaction; it is published only if that transaction commits."""
    event = OutboxEvent(id=new_id("evt"), type=event_type, payload=payload, created_at=utcnow(), published_at=None)
    session.add(event)
    return event


def claim_unpublished(session: Session, *, limit: int) -> list[OutboxEvent]:
    """The oldest unpublished events, locked so a concurrent relay skips them (PostgreSQL; SQLite serialises)."""
    query = (
        select(OutboxEvent)
        .where(OutboxEvent.published_at.is_(None))
        .order_by(OutboxEvent.created_at, OutboxEvent.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(query))


def mark_published(session: Session, *, event_id: str) -> None:
    """Stamp an event as published."""
    session.execute(update(OutboxEvent).where(OutboxEvent.id == event_id).values(published_at=utcnow()))


def oldest_unpublished_age(session: Session, *, now: datetime) -> float:
    """Seconds the oldest unpublished event has waited (0 when the outbox is drained)."""
    oldest = session.scalar(select(func.min(OutboxEvent.created_at)).where(OutboxEvent.published_at.is_(None)))
    return max((now - aware_utc(oldest)).total_seconds(), 0.0) if oldest is not None else 0.0


def aware_utc(value: datetime | str) -> datetime:
    """An aggregate's datetime as aware UTC: aggregates bypass UTCDateTime, and SQLite hands back naive UTC text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)
