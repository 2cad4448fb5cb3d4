"""The outbox relay and fair scheduler, run in every worker process.

Each pass, in one transaction: drain the outbox (a `batch.created` event wakes the scheduler up, it carries no work
itself), pick the items to queue (`batches.schedule`: per owner a bounded window of queued-but-unfinished items, topped
up as they finish, owners interleaved), publish them with confirms, a `batch.items` message per group of up to
`group` items of one batch (a worker runs a group in one llm request; `batch.item` when `group` is 1), and only then
stamp them queued and commit (on PostgreSQL the item rows are locked only for that last step: a worker handed an item
while the pass still publishes claims it without waiting; on SQLite the pass holds the database's write lock). A crash
before the commit means the next pass publishes again (workers are idempotent); a batch whose commit happened is always
found by the next pass, whichever process runs it, since the scheduler reads the items, not the messages. The same
thread expires batches past their completion window and refreshes the worker's gauges.

A pass runs every `interval`, and sooner once this process's workers have finished a quarter of a window's items:
waiting out the interval would leave the windows, and so the workers, empty between passes. Every pass tops up all
the room there is, whichever process's workers made it, so with several worker processes passes simply come from
all of their relays in turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

from parley_kit import tracing
from parley_kit.amqp import Publisher, connection_parameters, declare_work_queue
from parley_kit.db import Database, utcnow

from . import batches, metrics, outbox
from .models import BatchStatus
from .settings import JobsSettings

log = logging.getLogger(__name__)

ITEMS_MESSAGE = "batch.items"
ITEM_MESSAGE = "batch.item"  # one item, as workers before groups read it: what the relay sends with `group` 1
EVENTS_PER_PASS = 1000


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


def dead_queue_declarer(settings: JobsSettings) -> Callable[[BlockingChannel], str]:
    """Declares the same queues; returns the dead-letter queue's name (for the dead-letter consumer)."""
    declare = queue_declarer(settings)

    def declare_dead(channel: BlockingChannel) -> str:
        declare(channel)
        return settings.dead_queue

    return declare_dead


class QueueStats:
    """Reads the work queues' depths with passive declares on a connection of its own (reopened when it dies)."""

    def __init__(self, url: str, queues: dict[str, str]) -> None:
        self._params = connection_parameters(url)
        self._queues = queues
        self._connection: pika.BlockingConnection | None = None

    def depths(self) -> dict[str, int]:
        """{label: ready messages} for the queues that exist."""
        try:
            if self._connection is None or self._connection.is_closed:
                self._connection = pika.BlockingConnection(self._params)
            result = {}
            for label, queue in self._queues.items():
                channel = self._connection.channel()
                try:
                    result[label] = channel.queue_declare(queue, passive=True).method.message_count
                    channel.close()
                except AMQPError:  # not declared yet: the broker closed this channel
                    continue
            return result
        except (AMQPError, OSError):
            self.close()
            raise

    def close(self) -> None:
        """Drop the connection quietly."""
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except AMQPError:
                pass


def next_wait(previous: float, *, busy: bool, interval: float, idle_interval: float) -> float:
    """The wait before the next pass: `interval` after a pass with work, doubling after each quiet one up to
    `idle_interval`."""
    return interval if busy else min(max(previous, interval) * 2, idle_interval)


class Relay:
    """Drains the outbox and tops up the owners' windows every `interval` seconds, or when items have finished."""

    def __init__(
        self,
        db: Database,
        publisher: Publisher,
        *,
        queue: str,
        interval: float,
        idle_interval: float | None = None,
        window: int = 64,
        group: int = 1,
        stats: QueueStats | None = None,
        stats_interval: float = 5.0,
    ) -> None:
        self._db = db
        self._publisher = publisher
        self._queue = queue
        self._interval = interval
        self._idle_interval = max(interval, idle_interval or interval)
        self._window = window
        self._group = group
        self._stats = stats
        self._stats_interval = stats_interval
        self._stats_due = 0.0
        self._expiry_due = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._wake_after = max(1, window // 4)
        self._done_since_pass = 0
        self._done_lock = threading.Lock()

    def item_done(self, count: int = 1) -> None:
        """A worker of this process finished `count` items (their window has room): enough of them bring the next
        pass forward."""
        with self._done_lock:
            self._done_since_pass += count
            if self._done_since_pass < self._wake_after:
                return
            self._done_since_pass = 0
        self._wake.set()

    def run_once(self) -> tuple[int, int]:
        """One pass: drain the outbox and top up the owners' windows; (events drained, items queued)."""
        with self._db.transaction() as session:
            events = outbox.claim_unpublished(session, limit=EVENTS_PER_PASS)
            for event in events:
                if event.type != outbox.BATCH_CREATED:
                    log.warning("unknown outbox event type; marking it published", extra={"event.type": event.type})
                outbox.mark_published(session, event_id=event.id)
            groups = batches.schedule(session, window=self._window, group=self._group)
            item_ids = [item_id for group in groups for item_id in group]
            trace_of = batches.traceparents(session, [group[0] for group in groups]) if groups else {}
            try:
                for group in groups:
                    tracing.start(trace_of.get(group[0]))  # the items run in the trace of the request that made them
                    kind, data = (ITEMS_MESSAGE, {"item_ids": group}) if self._group > 1 else _single(group)
                    self._publisher.publish("", self._queue, kind, data, message_id=group[0])
            finally:
                tracing.clear()
            batches.mark_queued(session, item_ids, now=utcnow())
        if item_ids:
            log.info("batch items queued", extra={"batch.items_queued": len(item_ids)})
        return len(events), len(item_ids)

    def expire_due(self) -> list[str]:
        """End the batches whose completion window has passed."""
        with self._db.transaction() as session:
            expired = batches.expire_due(session, now=utcnow())
        for batch_id in expired:
            metrics.BATCHES.labels(status=BatchStatus.EXPIRED).inc()
            log.info("batch expired", extra={"batch.id": batch_id, "batch.status": BatchStatus.EXPIRED})
        return expired

    def refresh_gauges(self) -> None:
        """Queue depths, the oldest pending batch's age and the outbox lag, for Prometheus."""
        now = utcnow()
        with self._db.transaction() as session:
            metrics.OLDEST_PENDING_AGE.set(batches.oldest_pending_age(session, now=now))
            metrics.OUTBOX_LAG.set(outbox.oldest_unpublished_age(session, now=now))
        if self._stats is not None:
            for label, depth in self._stats.depths().items():
                metrics.QUEUE_DEPTH.labels(queue=label).set(depth)

    def run(self) -> None:
        """Poll until stopped; a failed step (broker or database down) is retried on the next tick. Quiet passes
        space the polls out up to `idle_interval` (an idle worker barely touches the database); work, or items
        finishing in this process, bring them back to `interval`."""
        wait = self._interval
        while not self._stop.is_set():
            self._wake.clear()  # items finishing from here on ask for the pass after this one
            busy = False
            try:
                events, items = self.run_once()
                busy = bool(events or items)
            except Exception:
                log.warning("relay step failed; retrying", extra={"step": "run_once"}, exc_info=True)
            if time.monotonic() >= self._expiry_due:
                self._expiry_due = time.monotonic() + self._interval
                try:
                    self.expire_due()
                except Exception:
                    log.warning("relay step failed; retrying", extra={"step": "expire_due"}, exc_info=True)
            if time.monotonic() >= self._stats_due:
                self._stats_due = time.monotonic() + self._stats_interval
                try:
                    self.refresh_gauges()
                except Exception:
                    log.warning("refreshing the worker gauges failed", exc_info=True)
            wait = next_wait(wait, busy=busy, interval=self._interval, idle_interval=self._idle_interval)
            if self._wake.wait(wait):
                wait = self._interval
        self._publisher.close()
        if self._stats is not None:
            self._stats.close()

    def start_in_thread(self) -> threading.Thread:
        """Run in a daemon thread."""
        thread = threading.Thread(target=self.run, name="outbox-relay", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Finish the current pass and return."""
        self._stop.set()
        self._wake.set()


def _single(group: list[str]) -> tuple[str, dict[str, str]]:
    """A one-item group as a `batch.item` message, which workers of every version read (a rolling upgrade runs with
    `JOBS_ITEM_GROUP=1` until no worker predates groups)."""
    (item_id,) = group
    return ITEM_MESSAGE, {"item_id": item_id}
