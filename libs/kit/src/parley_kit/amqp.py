"""RabbitMQ through pika: persistent messages with publisher confirms, consumers with prefetch, manual ack after
the work commits, work off the I/O thread, and reconnection after broker restarts.

Envelope of every message: `{id, type, occurred_at, traceparent, data}`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import (
    AMQPChannelError,
    AMQPConnectionError,
    AMQPError,
    ChannelClosedByBroker,
    NackError,
    UnroutableError,
)

from . import tracing
from .ids import new_id

log = logging.getLogger(__name__)

Declare = Callable[[BlockingChannel], str | None]


def connection_parameters(url: str) -> pika.URLParameters:
    """Parameters with the defaults pika gets wrong for services: no infinite blocking, a few connect attempts."""
    params = pika.URLParameters(url)
    params.heartbeat = 30
    params.blocked_connection_timeout = 30
    params.connection_attempts = 3
    params.retry_delay = 0.5
    params.socket_timeout = 5
    params.client_properties = {"connection_name": "parley"}
    return params


def check_broker(url: str) -> None:
    """Readiness: the broker accepts a connection."""
    params = connection_parameters(url)
    params.connection_attempts = 1
    pika.BlockingConnection(params).close()


def declare_work_queue(
    channel: BlockingChannel, queue: str, *, dead_letter_exchange: str, delivery_limit: int = 5
) -> None:
    """A durable quorum queue whose poison messages go to a dead-letter queue after `delivery_limit` attempts."""
    dead_letter_queue = f"{queue}.dead"
    channel.exchange_declare(dead_letter_exchange, exchange_type="direct", durable=True)
    channel.queue_declare(dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(dead_letter_queue, dead_letter_exchange, routing_key=queue)
    channel.queue_declare(
        queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": dead_letter_exchange,
            "x-dead-letter-routing-key": queue,
            "x-delivery-limit": delivery_limit,  # RabbitMQ 3.x has no default: without it a poison item loops forever
        },
    )


@dataclass(frozen=True, slots=True)
class Message:
    """A received envelope."""

    id: str
    type: str
    occurred_at: str
    traceparent: str | None
    data: dict[str, Any]
    delivery_count: int
    redelivered: bool


def encode(message_type: str, data: dict[str, Any], *, message_id: str | None = None) -> tuple[str, bytes]:
    """(id, body) of a new envelope carrying the current trace."""
    message_id = message_id or new_id("msg")
    traceparent = tracing.outbound_headers().get("traceparent")
    envelope = {
        "id": message_id,
        "type": message_type,
        "occurred_at": datetime.now(UTC).isoformat(),
        "traceparent": traceparent,
        "data": data,
    }
    return message_id, orjson.dumps(envelope)


def decode(body: bytes, properties: pika.BasicProperties, redelivered: bool) -> Message:
    """Parse an envelope; raises ValueError on anything else."""
    envelope = orjson.loads(body)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), dict):
        raise ValueError("not a Parley envelope")
    headers = properties.headers or {}
    return Message(
        id=str(envelope.get("id")),
        type=str(envelope.get("type")),
        occurred_at=str(envelope.get("occurred_at")),
        traceparent=envelope.get("traceparent"),
        data=envelope["data"],
        delivery_count=int(headers.get("x-delivery-count", 0)),
        redelivered=redelivered,
    )


class PublishFailed(Exception):
    """The broker did not confirm the message (nacked, unroutable, or unreachable)."""


class Publisher:
    """Publishes persistent, mandatory messages and waits for the broker's confirm; one connection per thread."""

    def __init__(self, url: str, *, declare: Declare | None = None) -> None:
        self._params = connection_parameters(url)
        self._declare = declare
        self._local = threading.local()

    def publish(
        self,
        exchange: str,
        routing_key: str,
        message_type: str,
        data: dict[str, Any],
        *,
        message_id: str | None = None,
    ) -> str:
        """Publish and return the message id once the broker has confirmed it; retried once on a new connection."""
        message_id, body = encode(message_type, data, message_id=message_id)
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,
            type=message_type,
            timestamp=int(time.time()),
        )
        for attempt in (1, 2):
            try:
                self._channel().basic_publish(exchange, routing_key, body, properties, mandatory=True)
                return message_id
            except (UnroutableError, NackError) as exc:
                raise PublishFailed(f"broker refused {message_type} to {exchange}/{routing_key}") from exc
            except ChannelClosedByBroker as exc:
                # A missing exchange or a permission error: a new connection would fail the same way.
                self.close()
                raise PublishFailed(f"broker closed the channel: {exc.reply_code} {exc.reply_text}") from exc
            except (AMQPError, OSError) as exc:
                self.close()
                if attempt == 2:
                    raise PublishFailed("broker unreachable") from exc
        raise AssertionError("unreachable")

    def _channel(self) -> BlockingChannel:
        channel = getattr(self._local, "channel", None)
        if channel is None or channel.is_closed:
            connection = pika.BlockingConnection(self._params)
            channel = connection.channel()
            channel.confirm_delivery()
            if self._declare:
                self._declare(channel)
            self._local.connection, self._local.channel = connection, channel
        return channel

    def close(self) -> None:
        """Close this thread's connection (quietly: it may already be dead)."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = self._local.channel = None
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except AMQPError:
                pass


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: it is dead-lettered at once, not retried."""


RETRY_BACKOFF_CAP = 10.0


class Consumer:
    """Consumes one queue with prefetch; handlers run on a thread pool and are acked only after they return.

    The I/O thread only moves bytes and heartbeats; acks go back to it through `add_callback_threadsafe`, since a
    pika connection is not thread-safe. Any connection loss (including a broker restart, code 320) reconnects with
    backoff; unacked messages are redelivered by the broker, so handlers must be idempotent.
    """

    def __init__(
        self,
        url: str,
        handler: Callable[[Message], None],
        *,
        declare: Declare,
        queue: str | None = None,
        prefetch: int = 8,
        name: str = "consumer",
        retry_backoff: float = 0.0,
    ) -> None:
        self._params = connection_parameters(url)
        self._handler = handler
        # A failed message waits retry_backoff x 2^(redeliveries so far), at most RETRY_BACKOFF_CAP s, before it is
        # requeued: a short outage of what the handler needs must not burn the delivery limit in milliseconds.
        self._retry_backoff = retry_backoff
        self._declare = declare
        self._queue = queue
        self._prefetch = prefetch
        self._name = name
        self._stop = threading.Event()
        self.connected = threading.Event()

    def stop(self) -> None:
        """Ask the loop to finish in-flight work and return."""
        self._stop.set()

    def run(self) -> None:
        """Consume until stopped, reconnecting with capped exponential backoff."""
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._consume()
                delay = 0.5
            except (AMQPError, OSError) as exc:
                self.connected.clear()
                log.warning(
                    "broker connection lost; reconnecting",
                    extra={"error.type": type(exc).__name__, "consumer": self._name, "retry_in_s": delay},
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def start_in_thread(self) -> threading.Thread:
        """Run in a daemon thread (a gevent greenlet where threads are patched)."""
        thread = threading.Thread(target=self.run, name=f"amqp-{self._name}", daemon=True)
        thread.start()
        return thread

    def _consume(self) -> None:
        connection = pika.BlockingConnection(self._params)
        pool = ThreadPoolExecutor(max_workers=self._prefetch, thread_name_prefix=f"{self._name}-work")
        try:
            channel = connection.channel()
            queue = self._declare(channel) or self._queue
            if not queue:
                raise ValueError("declare() returned no queue and none was given")
            channel.basic_qos(prefetch_count=self._prefetch)

            def on_message(ch: BlockingChannel, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
                if self._stop.is_set():
                    # Arrived while stopping (the pool may be shut already): left unacked, the broker requeues it
                    # when the connection closes.
                    return
                pool.submit(self._handle, connection, ch, method.delivery_tag, properties, body, method.redelivered)

            channel.basic_consume(queue, on_message)
            self.connected.set()
            log.info("consuming", extra={"consumer": self._name, "queue": queue})
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.5)
            pool.shutdown(wait=True)
            connection.process_data_events(time_limit=0)  # deliver the acks of the work just finished
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            self.connected.clear()
            if connection.is_open:
                try:
                    connection.close()
                except AMQPError:
                    pass

    def _retry_delay(self, redeliveries: int) -> float:
        """Seconds to wait before requeueing a message that failed after `redeliveries` earlier deliveries."""
        if self._retry_backoff <= 0:
            return 0.0
        return min(RETRY_BACKOFF_CAP, self._retry_backoff * 2 ** min(redeliveries, 16))

    def _handle(
        self,
        connection: pika.BlockingConnection,
        channel: BlockingChannel,
        tag: int,
        properties: pika.BasicProperties,
        body: bytes,
        redelivered: bool,
    ) -> None:
        settle: Callable[[], None]
        message: Message | None = None
        try:
            try:
                message = decode(body, properties, redelivered)
            except ValueError as exc:
                raise Reject("not a Parley envelope") from exc
            tracing.start(message.traceparent)
            self._handler(message)
            settle = lambda: channel.basic_ack(tag)  # noqa: E731
        except Reject as exc:
            log.error(
                "message rejected",
                extra={"consumer": self._name, "error.type": type(exc).__name__, "error.message": str(exc)},
            )
            settle = lambda: channel.basic_reject(tag, requeue=False)  # noqa: E731
        except Exception:
            delay = self._retry_delay(message.delivery_count if message is not None else 0)
            log.exception("message handler failed; requeued", extra={"consumer": self._name, "retry_in_s": delay})
            self._stop.wait(delay)  # holds a prefetch slot, not the thread pool's others; a stop cuts it short
            settle = lambda: channel.basic_nack(tag, requeue=True)  # noqa: E731
        finally:
            tracing.clear()
        try:
            connection.add_callback_threadsafe(settle)
        except (AMQPConnectionError, AMQPChannelError):
            pass  # the connection died; the broker redelivers and the idempotent handler copes
