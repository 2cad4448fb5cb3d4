"""AMQP on the real RabbitMQ: confirms, envelopes, acks, redelivery, dead-lettering, reconnection, stop."""

from __future__ import annotations

import contextlib
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

from parley_kit import amqp, tracing


@dataclass
class Names:
    """The broker names one test uses, all under the run's prefix; deleted at teardown."""

    prefix: str
    exchange: str = ""
    queue: str = ""
    dead_letter_exchange: str = ""

    def __post_init__(self) -> None:
        unique = uuid.uuid4().hex[:8]
        self.exchange = f"{self.prefix}.kit-{unique}.work"
        self.queue = f"{self.prefix}.kit-{unique}.items"
        self.dead_letter_exchange = f"{self.prefix}.kit-{unique}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        """Where declare_work_queue sends poison messages."""
        return f"{self.queue}.dead"


@dataclass
class Recorder:
    """A handler that records what it received and behaves as each test asks."""

    behaviour: Callable[[amqp.Message], None] = lambda _message: None
    received: queue.Queue[amqp.Message] = field(default_factory=queue.Queue)
    calls: list[amqp.Message] = field(default_factory=list)
    trace_ids: list[str | None] = field(default_factory=list)

    def __call__(self, message: amqp.Message) -> None:
        self.calls.append(message)
        context = tracing.current()
        self.trace_ids.append(context.trace_id if context else None)
        self.behaviour(message)
        self.received.put(message)


@pytest.fixture
def names(amqp_url: str, amqp_prefix: str) -> Iterator[Names]:
    """Fresh exchange/queue names; everything declared under them is deleted afterwards."""
    chosen = Names(amqp_prefix)
    yield chosen
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for name in (chosen.queue, chosen.dead_letter_queue):
        channel.queue_delete(name)
    for name in (chosen.exchange, chosen.dead_letter_exchange):
        channel.exchange_delete(name)
    connection.close()


@pytest.fixture
def admin(amqp_url: str) -> Iterator[BlockingChannel]:
    """A plain channel for the test's own inspection of queues."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    yield connection.channel()
    connection.close()


def declarer(names: Names, *, delivery_limit: int = 5, connections: list | None = None) -> amqp.Declare:
    """The owner's declarations; optionally remembers each connection the consumer opens."""

    def declare(channel: BlockingChannel) -> str:
        if connections is not None:
            connections.append(channel.connection)
        amqp.declare_work_queue(
            channel, names.queue, dead_letter_exchange=names.dead_letter_exchange, delivery_limit=delivery_limit
        )
        channel.exchange_declare(names.exchange, exchange_type="direct", durable=True)
        channel.queue_bind(names.queue, names.exchange, routing_key="item")
        return names.queue

    return declare


def count(channel: BlockingChannel, name: str) -> int:
    """Ready messages in a queue."""
    return channel.queue_declare(name, passive=True).method.message_count


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll until the predicate holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@contextlib.contextmanager
def running(consumer: amqp.Consumer) -> Iterator[threading.Thread]:
    """Run a consumer in its thread for the block, then stop it and check it ended."""
    thread = consumer.start_in_thread()
    try:
        assert consumer.connected.wait(10), "consumer never connected"
        yield thread
    finally:
        consumer.stop()
        thread.join(10)
    assert not thread.is_alive()


def test_published_messages_arrive_once_with_the_envelope_and_are_acked(
    amqp_url: str, names: Names, admin: BlockingChannel
) -> None:
    recorder = Recorder()
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names), name="kit-test")
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    with running(consumer):
        context = tracing.start()
        ids = [publisher.publish(names.exchange, "item", "item.created", {"n": n}) for n in range(20)]
        tracing.clear()
        got = [recorder.received.get(timeout=10) for _ in ids]
    publisher.close()
    assert sorted(m.id for m in got) == sorted(ids)
    assert len(recorder.calls) == 20  # once each
    assert sorted(m.data["n"] for m in got) == list(range(20))
    message = got[0]
    assert message.type == "item.created"
    assert datetime.fromisoformat(message.occurred_at).tzinfo is not None
    assert message.traceparent is not None and message.traceparent.split("-")[1] == context.trace_id
    assert not message.redelivered
    assert set(recorder.trace_ids) == {context.trace_id}  # the handler ran inside the publisher's trace
    assert count(admin, names.queue) == 0  # acked: nothing came back when the consumer disconnected
    assert count(admin, names.dead_letter_queue) == 0


def test_message_id_can_be_chosen(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    assert publisher.publish(names.exchange, "item", "t", {}, message_id="msg_fixed") == "msg_fixed"
    publisher.close()
    _method, properties, body = admin.basic_get(names.queue, auto_ack=True)
    assert properties.message_id == "msg_fixed" and properties.delivery_mode == 2
    assert amqp.decode(body, properties, False).id == "msg_fixed"


def test_failing_handler_is_redelivered_then_dead_lettered(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    def fail(_message: amqp.Message) -> None:
        raise RuntimeError("transient failure")

    recorder = Recorder(fail)
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names, delivery_limit=2), name="kit-test")
    publisher = amqp.Publisher(amqp_url, declare=declarer(names, delivery_limit=2))
    with running(consumer):
        message_id = publisher.publish(names.exchange, "item", "item.poison", {"n": 1})
        assert wait_for(lambda: count(admin, names.dead_letter_queue) == 1)
    publisher.close()
    attempts = [m for m in recorder.calls if m.id == message_id]
    assert len(attempts) == 3  # the first delivery plus `delivery_limit` redeliveries
    assert [m.redelivered for m in attempts] == [False, True, True]
    assert attempts[-1].delivery_count == 2
    assert count(admin, names.queue) == 0
    _, properties, body = admin.basic_get(names.dead_letter_queue, auto_ack=True)
    assert amqp.decode(body, properties, False).id == message_id


def test_failed_messages_are_requeued_after_a_growing_wait(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    """retry_backoff=0.3: the redeliveries come at least 0.3 s and then 0.6 s after the failures before them (the
    code's own minimum, not a speed claim), and a stop during a wait ends it at once."""
    seen: list[float] = []

    def fail(_message: amqp.Message) -> None:
        seen.append(time.monotonic())
        raise RuntimeError("transient failure")

    consumer = amqp.Consumer(
        amqp_url, Recorder(fail), declare=declarer(names, delivery_limit=2), name="kit-test", retry_backoff=0.3
    )
    publisher = amqp.Publisher(amqp_url, declare=declarer(names, delivery_limit=2))
    with running(consumer):
        publisher.publish(names.exchange, "item", "item.poison", {"n": 1})
        assert wait_for(lambda: count(admin, names.dead_letter_queue) == 1)
    publisher.close()
    assert len(seen) == 3
    assert seen[1] - seen[0] >= 0.3 and seen[2] - seen[1] >= 0.6

    slow = amqp.Consumer(
        amqp_url, Recorder(fail), declare=declarer(names, delivery_limit=2), name="kit-test", retry_backoff=60
    )
    publisher = amqp.Publisher(amqp_url, declare=declarer(names, delivery_limit=2))
    thread = slow.start_in_thread()
    assert slow.connected.wait(10)
    before = len(seen)
    publisher.publish(names.exchange, "item", "item.poison", {"n": 2})
    assert wait_for(lambda: len(seen) > before)  # failed once: now waiting 60 s before the requeue
    slow.stop()
    thread.join(10)
    publisher.close()
    assert not thread.is_alive()  # the stop cut the wait short; the message is requeued by the broker


def test_reject_goes_to_the_dead_letter_queue_at_once(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    def reject(_message: amqp.Message) -> None:
        raise amqp.Reject("can never succeed")

    recorder = Recorder(reject)
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names), name="kit-test")
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    with running(consumer):
        publisher.publish(names.exchange, "item", "item.bad", {"n": 1})
        assert wait_for(lambda: count(admin, names.dead_letter_queue) == 1)
    publisher.close()
    assert len(recorder.calls) == 1
    assert count(admin, names.queue) == 0


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"id": "x", "data": "not an object"}', b"\xff"])
def test_non_envelope_body_is_rejected(amqp_url: str, names: Names, admin: BlockingChannel, body: bytes) -> None:
    recorder = Recorder()
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names), name="kit-test")
    with running(consumer):
        admin.basic_publish(names.exchange, "item", body)
        assert wait_for(lambda: count(admin, names.dead_letter_queue) == 1)
    assert recorder.calls == []
    assert count(admin, names.queue) == 0


def close_socket_under(connection: pika.BlockingConnection) -> None:
    """Cut a pika connection's TCP stream from outside (as a network failure would)."""
    connection._impl._transport._sock.shutdown(socket.SHUT_RDWR)


def local_port(connection: pika.BlockingConnection) -> int:
    """The client-side port of a pika connection, which names it in `rabbitmqctl list_connections`."""
    return connection._impl._transport._sock.getsockname()[1]


def close_by_broker(connection: pika.BlockingConnection) -> None:
    """Have RabbitMQ close exactly this connection (code 320, as on a broker shutdown)."""
    port = str(local_port(connection))
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "--no-table-headers", "list_connections", "pid", "peer_host", "peer_port"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    mine = [line.split("\t")[0] for line in listing.splitlines() if line.split("\t")[1:] == ["127.0.0.1", port]]
    assert len(mine) == 1, listing
    subprocess.run(
        ["rabbitmqctl", "close_connection", mine[0], "kit test"], capture_output=True, timeout=60, check=True
    )


def rabbitmqctl_works() -> bool:
    """Whether this machine can run rabbitmqctl against the local broker."""
    if shutil.which("rabbitmqctl") is None:
        return False
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        return subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True, timeout=60).returncode == 0
    return False


@pytest.mark.parametrize("how", ["socket", "broker"])
def test_consumer_reconnects_after_losing_its_connection(
    amqp_url: str, names: Names, admin: BlockingChannel, how: str
) -> None:
    if how == "broker" and not rabbitmqctl_works():
        pytest.skip("rabbitmqctl cannot reach the local broker")
    connections: list[pika.BlockingConnection] = []
    recorder = Recorder()
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names, connections=connections), name="kit-test")
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    with running(consumer):
        publisher.publish(names.exchange, "item", "before", {})
        assert recorder.received.get(timeout=10).type == "before"
        (close_socket_under if how == "socket" else close_by_broker)(connections[0])
        assert wait_for(lambda: len(connections) == 2 and consumer.connected.is_set())
        publisher.publish(names.exchange, "item", "after", {})
        assert wait_for(lambda: any(m.type == "after" for m in recorder.calls))
    publisher.close()
    # "before" may come again if the cut beat its ack: at-least-once, flagged as a redelivery.
    before = [m for m in recorder.calls if m.type == "before"]
    assert len(before) in (1, 2) and all(m.redelivered for m in before[1:])
    assert [m.type for m in recorder.calls if m.type == "after"] == ["after"]
    assert count(admin, names.queue) == 0


def test_stop_returns_promptly_and_finishes_in_flight_work(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    release = threading.Event()
    recorder = Recorder(lambda _m: release.wait(5) and None)
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names), name="kit-test", prefetch=2)
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    thread = consumer.start_in_thread()
    assert consumer.connected.wait(10)
    for n in range(6):
        publisher.publish(names.exchange, "item", "slow", {"n": n})
    publisher.close()
    assert wait_for(lambda: len(recorder.calls) == 2)  # prefetch 2: two in flight
    started = time.monotonic()
    consumer.stop()
    assert time.monotonic() - started < 0.1
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - started < 3.0
    assert recorder.received.qsize() == len(recorder.calls)  # every started handler finished
    # The finished ones were acked; the rest went back to the queue for the next consumer.
    # (the broker requeues a closed connection's unacked messages asynchronously, hence the poll)
    assert wait_for(lambda: count(admin, names.queue) == 6 - len(recorder.calls))
    assert len(recorder.calls) == 2


def test_idle_consumer_stops_promptly(amqp_url: str, names: Names) -> None:
    consumer = amqp.Consumer(amqp_url, Recorder(), declare=declarer(names), name="kit-test")
    thread = consumer.start_in_thread()
    assert consumer.connected.wait(10)
    started = time.monotonic()
    consumer.stop()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0
    assert not consumer.connected.is_set()


def test_publishing_to_a_missing_exchange_fails(amqp_url: str, amqp_prefix: str) -> None:
    publisher = amqp.Publisher(amqp_url)
    with pytest.raises(amqp.PublishFailed, match="404 NOT_FOUND - no exchange"):
        publisher.publish(f"{amqp_prefix}.kit-missing-{uuid.uuid4().hex[:8]}", "item", "t", {})
    publisher.close()


def test_unroutable_message_fails(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    admin.exchange_declare(names.exchange, exchange_type="direct", durable=True)
    publisher = amqp.Publisher(amqp_url)
    with pytest.raises(amqp.PublishFailed, match="refused"):
        publisher.publish(names.exchange, "nobody-bound", "t", {})
    # The publisher still works afterwards.
    declarer(names)(admin)
    publisher.publish(names.exchange, "item", "t", {})
    publisher.close()
    assert count(admin, names.queue) == 1


def test_publisher_recovers_after_its_connection_dies(amqp_url: str, names: Names, admin: BlockingChannel) -> None:
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    publisher.publish(names.exchange, "item", "t", {})
    close_socket_under(publisher._local.connection)
    publisher.publish(names.exchange, "item", "t", {})
    publisher.close()
    assert count(admin, names.queue) == 2


def test_unreachable_broker_fails_publish(amqp_prefix: str) -> None:
    from parley_kit.testing import free_port

    publisher = amqp.Publisher(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    publisher._params.connection_attempts = 1
    with pytest.raises(amqp.PublishFailed, match="unreachable"):
        publisher.publish(f"{amqp_prefix}.x", "k", "t", {})


def test_check_broker(amqp_url: str) -> None:
    from parley_kit.testing import free_port

    amqp.check_broker(amqp_url)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        amqp.check_broker(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")


def test_message_arriving_while_stopping_is_left_for_the_next_consumer(
    amqp_url: str, names: Names, admin: BlockingChannel
) -> None:
    release = threading.Event()
    recorder = Recorder(lambda _m: release.wait(5) and None)
    consumer = amqp.Consumer(amqp_url, recorder, declare=declarer(names), name="kit-test", prefetch=4)
    publisher = amqp.Publisher(amqp_url, declare=declarer(names))
    thread = consumer.start_in_thread()
    assert consumer.connected.wait(10)
    publisher.publish(names.exchange, "item", "first", {})
    assert wait_for(lambda: len(recorder.calls) == 1)
    consumer.stop()
    time.sleep(0.6)  # not synchronisation: lets the I/O loop leave its last poll, so the next delivery lands late
    publisher.publish(names.exchange, "item", "late", {})
    publisher.close()
    release.set()
    thread.join(10)
    assert not thread.is_alive()
    assert [m.type for m in recorder.calls] == ["first"]
    assert wait_for(lambda: count(admin, names.queue) == 1)  # "late" is back in the queue, "first" was acked
    _, properties, body = admin.basic_get(names.queue, auto_ack=True)
    assert amqp.decode(body, properties, False).type == "late"
