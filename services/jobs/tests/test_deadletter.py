"""Poison items on the real broker: after the delivery limit RabbitMQ dead-letters them, and the worker's
dead-letter consumer records them failed, so they reach the error file and the batch ends."""

from __future__ import annotations

import time
from collections.abc import Callable

import pika
import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from parley_jobs.models import BatchItem
from parley_jobs.relay import Relay, dead_queue_declarer, queue_declarer
from parley_jobs.settings import JobsSettings
from parley_jobs.worker import build_processor
from parley_kit.amqp import Consumer, Message, Publisher
from parley_kit.db import Database
from parley_kit.testing import eventually

pytestmark = pytest.mark.integration


def test_an_item_that_keeps_failing_goes_to_the_dead_letter_queue_and_the_error_file(
    make_settings: Callable[..., JobsSettings], db: Database, make_batch: Callable, client: FlaskClient, auth: Callable
) -> None:
    settings = make_settings(delivery_limit=2, llm_url="http://127.0.0.1:1", auth_url="http://127.0.0.1:1")
    batch = make_batch(1)
    deliveries: list[int] = []

    def crash(message: Message) -> None:  # a worker that dies on this item every time
        deliveries.append(message.delivery_count)
        raise RuntimeError("boom")

    publisher = Publisher(settings.amqp_url, declare=queue_declarer(settings))
    items = Consumer(settings.amqp_url, crash, declare=queue_declarer(settings), prefetch=1, name="crash")
    dead = Consumer(
        settings.amqp_url,
        build_processor(settings, db).handle_dead,
        declare=dead_queue_declarer(settings),
        prefetch=1,
        name="dead",
    )
    try:
        Relay(db, publisher, queue=settings.items_queue, interval=0.05).run_once()
        items.start_in_thread()
        dead.start_in_thread()
        deadline = time.monotonic() + 30
        status = "pending"
        while status == "pending" and time.monotonic() < deadline:
            time.sleep(0.05)
            with db.transaction() as session:
                status = session.scalar(select(BatchItem.status).where(BatchItem.batch_id == batch["id"]))
        assert status == "failed"
        assert len(deliveries) == settings.delivery_limit + 1  # the first delivery and the redeliveries
        # The batch is finalised in a transaction of its own, just after the item's result.
        assert eventually(
            lambda: client.get(f"/v1/batches/{batch['id']}", headers=auth()).json["status"] != "in_progress"
        )
        done = client.get(f"/v1/batches/{batch['id']}", headers=auth()).json
        assert done["status"] == "completed" and done["request_counts"]["failed"] == 1
        errors = client.get(f"/v1/files/{done['error_file_id']}/content", headers=auth()).data
        assert b"delivery_limit_exceeded" in errors
    finally:
        items.stop()
        dead.stop()
        publisher.close()
        channel = pika.BlockingConnection(pika.URLParameters(settings.amqp_url)).channel()
        channel.queue_delete(settings.items_queue)
        channel.queue_delete(settings.dead_queue)
        channel.exchange_delete(settings.dead_letter_exchange)
        channel.connection.close()
