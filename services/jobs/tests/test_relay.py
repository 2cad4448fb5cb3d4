"""The outbox relay against real PostgreSQL and RabbitMQ: every pending item of a new batch reaches the queue."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pika
import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from parley_jobs import batches, outbox
from parley_jobs.models import BatchItem, OutboxEvent
from parley_jobs.relay import Relay, next_wait, queue_declarer
from parley_jobs.settings import JobsSettings
from parley_jobs.worker import message_item_ids
from parley_kit.amqp import Publisher, PublishFailed
from parley_kit.db import Database, utcnow

from .test_results import item_ids


@pytest.fixture
def own_queues(settings: JobsSettings, amqp_url: str) -> Iterator[None]:
    """This test's items queue, its dead-letter queue and exchange are deleted afterwards."""
    yield
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_delete(settings.items_queue)
    channel.queue_delete(f"{settings.items_queue}.dead")
    channel.exchange_delete(settings.dead_letter_exchange)
    connection.close()


@pytest.fixture
def relay(settings: JobsSettings, db: Database, own_queues: None) -> Iterator[Relay]:
    """A relay publishing to this test's own queue."""
    publisher = Publisher(settings.amqp_url, declare=queue_declarer(settings))
    yield Relay(db, publisher, queue=settings.items_queue, interval=0.05)
    publisher.close()


def drain(amqp_url: str, settings: JobsSettings) -> list[tuple[Any, dict[str, Any]]]:
    """Every message now in the items queue (declared here if nothing was published yet), as (properties, envelope)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    queue = queue_declarer(settings)(channel)
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        messages.append((properties, orjson.loads(body)))
    connection.close()
    return messages


def test_the_relay_publishes_every_pending_item_in_groups(
    settings: JobsSettings, db: Database, make_batch: Callable, amqp_url: str, own_queues: None
) -> None:
    batch = make_batch(5)
    publisher = Publisher(settings.amqp_url, declare=queue_declarer(settings))
    relay = Relay(db, publisher, queue=settings.items_queue, interval=0.05, group=2)
    try:
        assert relay.run_once() == (1, 5)
        assert relay.run_once() == (0, 0)  # published events and items are not sent again
    finally:
        publisher.close()
    messages = drain(amqp_url, settings)
    items = item_ids(db, batch["id"])
    assert [envelope["data"] for _, envelope in messages] == [
        {"item_ids": items[0:2]},
        {"item_ids": items[2:4]},
        {"item_ids": items[4:]},
    ]
    for properties, envelope in messages:
        assert envelope["type"] == "batch.items"
        assert properties.delivery_mode == 2  # persistent
        assert properties.message_id == envelope["data"]["item_ids"][0]
    with db.transaction() as session:
        (event,) = session.scalars(select(OutboxEvent)).all()
        assert event.published_at is not None


def test_with_groups_of_one_the_relay_sends_the_single_item_message_every_worker_reads(
    relay: Relay, settings: JobsSettings, db: Database, make_batch: Callable, amqp_url: str
) -> None:
    """`JOBS_ITEM_GROUP=1` (a rolling upgrade from workers that predate groups): `batch.item`, one `item_id` each."""
    batch = make_batch(2)
    assert relay.run_once() == (1, 2)
    messages = drain(amqp_url, settings)
    assert [(envelope["type"], envelope["data"]) for _, envelope in messages] == [
        ("batch.item", {"item_id": item_id}) for item_id in item_ids(db, batch["id"])
    ]


class ClaimingPublisher(Publisher):
    """Publishes, then has a worker claim the item at once on another connection (as a fast worker does while the
    pass is still publishing the rest), with a lock timeout instead of waiting for the pass's transaction."""

    def __init__(self, url: str, db: Database, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.db = db
        self.claimed: list[str] = []

    def publish(self, exchange: str, routing_key: str, event_type: str, data: dict[str, Any], **kwargs: Any) -> str:
        published = super().publish(exchange, routing_key, event_type, data, **kwargs)
        with self.db.engine.connect() as connection:
            connection.exec_driver_sql("SET LOCAL lock_timeout = '1s'")
            works = batches.claim_items(connection, item_ids=message_item_ids(data))
            connection.commit()
        assert [work.item_id for work in works] == message_item_ids(data)
        self.claimed += message_item_ids(data)
        return published


def test_a_worker_claims_a_published_item_without_waiting_for_the_pass(
    settings: JobsSettings, db: Database, make_batch: Callable, amqp_url: str, own_queues: None
) -> None:
    """The pass stamps its items queued only after publishing them all: their rows are not locked while it publishes."""
    batch = make_batch(3)
    publisher = ClaimingPublisher(settings.amqp_url, db, declare=queue_declarer(settings))
    try:
        assert Relay(db, publisher, queue=settings.items_queue, interval=0.05).run_once() == (1, 3)
    finally:
        publisher.close()
    items = item_ids(db, batch["id"])
    assert publisher.claimed == items
    with db.transaction() as session:
        rows = session.execute(select(BatchItem.attempts, BatchItem.queued_at).where(BatchItem.batch_id == batch["id"]))
        assert [(attempts, queued_at is not None) for attempts, queued_at in rows] == [(1, True)] * 3
    assert len(drain(amqp_url, settings)) == 3


class FailingPublisher(Publisher):
    """Confirms `succeed` messages, then fails as a broker that went away mid-pass."""

    def __init__(self, url: str, *, succeed: int, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.left = succeed

    def publish(self, *args: Any, **kwargs: Any) -> str:
        if self.left == 0:
            raise PublishFailed("broker unreachable")
        self.left -= 1
        return super().publish(*args, **kwargs)


def queued_at_by_item(db: Database, batch_id: str) -> list[bool]:
    with db.transaction() as session:
        query = select(BatchItem.queued_at).where(BatchItem.batch_id == batch_id).order_by(BatchItem.line)
        return [queued_at is not None for queued_at in session.scalars(query)]


def test_a_pass_failing_mid_publish_stamps_nothing_and_the_next_pass_publishes_the_rest(
    settings: JobsSettings, db: Database, make_batch: Callable, amqp_url: str, own_queues: None
) -> None:
    """A crash between the publishes and the commit: nothing is stamped, every item still pending goes out again
    (an item a worker finished meanwhile does not), and each item is stamped once it is out."""
    batch = make_batch(3)
    items = item_ids(db, batch["id"])
    failing = FailingPublisher(settings.amqp_url, succeed=2, declare=queue_declarer(settings))
    try:
        with pytest.raises(PublishFailed):
            Relay(db, failing, queue=settings.items_queue, interval=0.05).run_once()
    finally:
        failing.close()
    assert queued_at_by_item(db, batch["id"]) == [False] * 3
    with db.transaction() as session:  # a worker ran the first item from the message that did go out
        batches.record_result(session, item_id=items[0], succeeded=True, status_code=200, body={})
    publisher = Publisher(settings.amqp_url, declare=queue_declarer(settings))
    try:
        assert Relay(db, publisher, queue=settings.items_queue, interval=0.05).run_once() == (1, 2)
    finally:
        publisher.close()
    published = [envelope["data"]["item_id"] for _, envelope in drain(amqp_url, settings)]
    assert published == [items[0], items[1], *items[1:]]  # the failed pass's two, then the next pass's two
    assert queued_at_by_item(db, batch["id"]) == [False, True, True]


def test_scheduling_alone_stamps_nothing(db: Database, make_batch: Callable) -> None:
    """Until `mark_queued`, the picked items are not queued: a pass that stops before it picks them again."""
    items = item_ids(db, make_batch(2)["id"])
    with db.transaction() as session:
        assert batches.schedule(session, window=10, group=2) == [items]
    with db.transaction() as session:
        assert batches.schedule(session, window=10, group=2) == [items]
        batches.mark_queued(session, items, now=utcnow())
    with db.transaction() as session:
        assert batches.schedule(session, window=10, group=2) == []


def test_the_queue_is_a_quorum_queue_with_a_delivery_limit(
    relay: Relay, settings: JobsSettings, make_batch: Callable, amqp_url: str
) -> None:
    make_batch(1)
    relay.run_once()
    channel = pika.BlockingConnection(pika.URLParameters(amqp_url)).channel()
    # Redeclaring with the same arguments succeeds only if they match what the relay declared.
    channel.queue_declare(
        settings.items_queue,
        durable=True,
        passive=False,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-dead-letter-routing-key": settings.items_queue,
            "x-delivery-limit": settings.delivery_limit,
        },
    )
    assert channel.queue_declare(settings.items_queue, passive=True).method.message_count == 1
    channel.connection.close()


def test_items_cancelled_before_the_relay_ran_are_not_published(
    relay: Relay, settings: JobsSettings, client: FlaskClient, auth: Callable, make_batch: Callable, amqp_url: str
) -> None:
    batch = make_batch(2)
    assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth()).json["status"] == "cancelled"
    assert relay.run_once()[0] == 1
    assert drain(amqp_url, settings) == []


def test_an_event_locked_by_another_relay_is_skipped(
    relay: Relay, settings: JobsSettings, db: Database, make_batch: Callable, amqp_url: str
) -> None:
    make_batch(2)
    with db.transaction() as other:  # another relay holds the row
        assert len(outbox.claim_unpublished(other, limit=10)) == 1
        assert relay.run_once()[0] == 0
    assert relay.run_once()[0] == 1
    assert len(drain(amqp_url, settings)) == 2


def test_a_failed_publish_leaves_the_event_for_the_next_pass(
    settings: JobsSettings, db: Database, make_batch: Callable
) -> None:
    make_batch(1)
    unreachable = Publisher("amqp://guest:guest@127.0.0.1:1/%2F")
    relay = Relay(db, unreachable, queue=settings.items_queue, interval=0.05)
    with pytest.raises(Exception, match="unreachable"):
        relay.run_once()
    with db.transaction() as session:
        assert session.scalars(select(OutboxEvent.published_at)).all() == [None]


def test_quiet_passes_space_the_polls_out_and_work_brings_them_back() -> None:
    """An idle worker polls the outbox ever less often, up to the idle interval; a pass with work resets the wait."""
    waits, wait = [], 0.2
    for busy in (False, False, False, False, False, True, False):
        wait = next_wait(wait, busy=busy, interval=0.2, idle_interval=1.0)
        waits.append(wait)
    assert waits == [0.4, 0.8, 1.0, 1.0, 1.0, 0.2, 0.4]
