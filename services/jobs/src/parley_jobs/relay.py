"""The outbox relay: publishes one `batch.item` message per pending item of each new batch, with confirms,
then marks the event published. A crash in between only means the next pass publishes again (workers are
idempotent); `FOR UPDATE SKIP LOCKED` lets several relays share the outbox on PostgreSQL."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pika.adapters.blocking_connection import BlockingChannel
from sqlalchemy import select

from parley_kit.amqp import Publisher, declare_work_queue
from parley_kit.db import Database

from . import outbox
from .models import BatchItem, ItemStatus
from .settings import JobsSettings

log = logging.getLogger(__name__)

ITEM_MESSAGE = "batch.item"
EVENTS_PER_PASS = 10


def queue_declarer(settings: JobsSettings) -> Callable[[BlockingChannel], str]:
    """Declares the items work queue (and its dead-letter side); returns its name."""

    def declare(channel: BlockingChannel) -> str:
        declare_work_queue(
            channel,
            settings.items_queue,
            dead_letter_exchange=settings.dead_letter_exchange,
            delivery_limit=settings.delivery_limit,
        )
        return settings.items_queue

    return declare


class Relay:
    """Drains the outbox to the work queue every `interval` seconds."""

    def __init__(self, db: Database, publisher: Publisher, *, queue: str, interval: float) -> None:
        self._db = db
        self._publisher = publisher
        self._queue = queue
        self._interval = interval
        self._stop = threading.Event()

    def run_once(self) -> int:
        """Publish every unpublished event (a few per transaction); returns how many were published."""
        published = 0
        while True:
            with self._db.transaction() as session:
                events = outbox.claim_unpublished(session, limit=EVENTS_PER_PASS)
                for event in events:
                    if event.type == outbox.BATCH_CREATED:
                        self._publish_batch(session, str(event.payload.get("batch_id")))
                    else:
                        log.warning("unknown outbox event type; marking it published", extra={"event.type": event.type})
                    outbox.mark_published(session, event_id=event.id)
                    published += 1
            if len(events) < EVENTS_PER_PASS:
                return published

    def _publish_batch(self, session: object, batch_id: str) -> None:
        """One message per item still pending (cancelled or finished items need none)."""
        item_ids = session.scalars(  # type: ignore[attr-defined]
            select(BatchItem.id)
            .where(BatchItem.batch_id == batch_id, BatchItem.status == ItemStatus.PENDING)
            .order_by(BatchItem.line)
        ).all()
        for item_id in item_ids:
            self._publisher.publish("", self._queue, ITEM_MESSAGE, {"item_id": item_id}, message_id=item_id)
        log.info("batch queued", extra={"batch.id": batch_id, "batch.items_queued": len(item_ids)})

    def run(self) -> None:
        """Poll until stopped; a failed pass (broker or database down) is retried on the next tick."""
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.warning("outbox relay pass failed; retrying", exc_info=True)
            self._stop.wait(self._interval)
        self._publisher.close()

    def start_in_thread(self) -> threading.Thread:
        """Run in a daemon thread."""
        thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Finish the current pass and return."""
        self._stop.set()
