"""Identity events on real RabbitMQ: `key.revoked` and `user.disabled` reach a queue bound to the events exchange."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pika
import pytest
from flask.testing import FlaskClient
from pika.adapters.blocking_connection import BlockingChannel

from parley_auth import create_app, service
from parley_auth.settings import AuthSettings
from parley_kit.testing import free_port


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def events_queue(amqp_url: str, amqp_prefix: str) -> Iterator[tuple[BlockingChannel, str]]:
    """A private queue bound to every event on `<prefix>.events`, as a gateway would bind one."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    exchange = f"{amqp_prefix}.events"
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(queue, exchange, routing_key="#")
    yield channel, queue
    channel.exchange_delete(exchange)
    connection.close()


def next_message(channel: Any, queue: str, timeout: float = 10.0) -> dict[str, Any]:
    """Poll the queue until a message arrives (or fail at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            assert properties.delivery_mode == 2  # persistent
            return {"routing_key": method.routing_key, **orjson.loads(body)}
        connection = channel.connection
        connection.process_data_events(time_limit=0.05)
    raise AssertionError(f"no message on {queue} within {timeout}s")


@pytest.fixture
def events_client(make_settings: Callable[..., AuthSettings], amqp_url: str, amqp_prefix: str) -> Iterator[FlaskClient]:
    """An app that publishes to the real broker under this run's prefix."""
    app = create_app(make_settings(amqp_url=amqp_url, amqp_prefix=amqp_prefix))
    yield app.test_client()
    context = app.extensions["parley_auth"]
    context.events.close()
    context.db.dispose()


PASSWORD = "long enough password"


def register(client: FlaskClient, email: str, password: str = PASSWORD) -> tuple[str, str]:
    user_id = client.post("/auth/register", json={"email": email, "password": password}).json["id"]
    token = client.post("/auth/token", json={"email": email, "password": password}).json["access_token"]
    return user_id, token


def test_key_revoked_is_published_after_the_revocation(events_client: FlaskClient, events_queue: Any) -> None:
    channel, queue = events_queue
    user_id, token = register(events_client, "events-key@example.com")
    key_id = events_client.post("/auth/api-keys", json={"name": "k"}, headers=auth(token)).json["id"]

    assert events_client.delete(f"/auth/api-keys/{key_id}", headers=auth(token)).status_code == 204
    message = next_message(channel, queue)
    assert message["routing_key"] == "key.revoked" and message["type"] == "key.revoked"
    assert message["data"] == {"key_id": key_id, "user_id": user_id}
    assert message["id"].startswith("msg_") and message["occurred_at"]
    assert "traceparent" in message


def test_user_disabled_is_published(
    make_settings: Callable[..., AuthSettings], amqp_url: str, amqp_prefix: str, events_queue: Any
) -> None:
    channel, queue = events_queue
    settings = make_settings(
        amqp_url=amqp_url,
        amqp_prefix=amqp_prefix,
        admin_email="events-admin@example.com",
        admin_password="admin pw 123",
    )
    app = create_app(settings)
    client = app.test_client()
    user_id, _ = register(client, "events-disabled@example.com")
    admin_token = client.post("/auth/token", json={"email": "events-admin@example.com", "password": "admin pw 123"})
    headers = auth(admin_token.json["access_token"])
    assert client.post(f"/auth/users/{user_id}/disable", headers=headers).status_code == 204
    message = next_message(channel, queue)
    assert message["type"] == "user.disabled" and message["data"] == {"user_id": user_id}
    app.extensions["parley_auth"].events.close()
    app.extensions["parley_auth"].db.dispose()


def test_an_unreachable_broker_does_not_fail_the_revocation(make_settings: Callable[..., AuthSettings]) -> None:
    app = create_app(make_settings(amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"))
    client = app.test_client()
    _, token = register(client, "events-nobroker@example.com")
    created = client.post("/auth/api-keys", json={"name": "k"}, headers=auth(token)).json
    assert client.delete(f"/auth/api-keys/{created['id']}", headers=auth(token)).status_code == 204
    # The revocation is committed all the same: the key no longer exchanges.
    gateway = client.post(
        "/auth/service-token", json={"client_id": "gateway", "client_secret": "gateway-test-secret-0123456789"}
    ).json["access_token"]
    refused = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=auth(gateway))
    assert refused.status_code == 401
    app.extensions["parley_auth"].db.dispose()


def no_message(channel: Any, queue: str) -> None:
    """Nothing is waiting on the queue (events are published before the route answers, so no wait is needed)."""
    channel.connection.process_data_events(time_limit=0)
    method, _properties, body = channel.basic_get(queue, auto_ack=True)
    assert method is None, body


def test_patch_publishes_user_disabled_once_and_re_enable_publishes_nothing(
    events_client: FlaskClient, events_queue: Any
) -> None:
    channel, queue = events_queue
    with events_client.application.extensions["parley_auth"].db.transaction() as session:
        service.create_user(session, email="events-patch-admin@example.com", password=PASSWORD, role="admin")
    login = {"email": "events-patch-admin@example.com", "password": PASSWORD}
    admin_token = events_client.post("/auth/token", json=login).json["access_token"]
    user_id, _ = register(events_client, "events-patched@example.com")
    path, headers = f"/auth/users/{user_id}", auth(admin_token)

    assert events_client.patch(path, json={"disabled": True}, headers=headers).status_code == 200
    message = next_message(channel, queue)
    assert message["type"] == "user.disabled" and message["data"] == {"user_id": user_id}
    assert events_client.patch(path, json={"disabled": True}, headers=headers).status_code == 200  # already disabled
    assert events_client.patch(path, json={"disabled": False, "role": "member"}, headers=headers).status_code == 200
    no_message(channel, queue)  # re-enabled, and the role it had


def test_a_role_change_is_published_once(events_client: FlaskClient, events_queue: Any) -> None:
    """Tokens carry the role: a promotion or a demotion tells the gateways (they refuse older tokens); setting the
    role a user already has does not."""
    channel, queue = events_queue
    with events_client.application.extensions["parley_auth"].db.transaction() as session:
        service.create_user(session, email="events-role-admin@example.com", password=PASSWORD, role="admin")
    login = {"email": "events-role-admin@example.com", "password": PASSWORD}
    admin_token = events_client.post("/auth/token", json=login).json["access_token"]
    user_id, _ = register(events_client, "events-role@example.com")
    path, headers = f"/auth/users/{user_id}", auth(admin_token)

    for role in ("admin", "member"):
        assert events_client.patch(path, json={"role": role}, headers=headers).status_code == 200
        message = next_message(channel, queue)
        assert message["type"] == "user.role_changed" and message["data"] == {"user_id": user_id, "role": role}
    assert events_client.patch(path, json={"role": "member"}, headers=headers).status_code == 200
    no_message(channel, queue)
    # a disable and a new role at once: both events
    assert events_client.patch(path, json={"disabled": True, "role": "admin"}, headers=headers).status_code == 200
    assert [next_message(channel, queue)["type"] for _ in range(2)] == ["user.disabled", "user.role_changed"]
    # an admin's refused self-demotion changes nothing and tells nobody
    admin_id = events_client.get("/auth/me", headers=headers).json["id"]
    refused = events_client.patch(f"/auth/users/{admin_id}", json={"role": "member"}, headers=headers)
    assert refused.status_code == 400
    no_message(channel, queue)


def test_password_changed_is_published(events_client: FlaskClient, events_queue: Any) -> None:
    channel, queue = events_queue
    user_id, token = register(events_client, "events-password@example.com")
    change = {"current_password": PASSWORD, "new_password": "another long password"}
    assert events_client.post("/auth/password", json=change, headers=auth(token)).status_code == 204
    message = next_message(channel, queue)
    assert message["type"] == "password.changed" and message["data"] == {"user_id": user_id}
