"""A typed model for the kit's database tests."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from parley_kit.db import UTCDateTime, make_metadata


class Base(DeclarativeBase):
    """Declarative base with the kit's naming convention."""

    metadata = make_metadata()


class Event(Base):
    """Something that happened at an instant."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    happened_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
