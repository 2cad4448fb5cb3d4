"""The key exchange against the REAL auth service: `python -m parley_auth migrate` + `serve` on a fresh PostgreSQL
database and the real RabbitMQ, with the gateway app in process in front of the fake provider."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pika
import pytest
import requests

from parley_gateway import GatewaySettings, create_app
from parley_kit.testing import PostgresServer, free_port
from parley_platform import start_service

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


@dataclass
class RealAuth:
    """The running auth process, the gateway secret it knows and its broker prefix."""

    url: str
    gateway_secret: str
    amqp_prefix: str


@pytest.fixture(scope="module")
def real_auth(
    postgres: PostgresServer, amqp_url: str, amqp_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealAuth]:
    """auth migrated and served (one worker) with its own broker prefix, publishing identity events."""
    workdir = tmp_path_factory.mktemp("real-auth")
    port = free_port()
    prefix = f"{amqp_prefix}-gw-auth"
    gateway_secret = secrets.token_urlsafe(24)
    env = {
        "PARLEY_ENV": "test",
        "PARLEY_AMQP_URL": amqp_url,
        "PARLEY_AMQP_PREFIX": prefix,
        "AUTH_DATABASE_URL": postgres.create_database("gateway_auth"),
        "AUTH_BIND": f"127.0.0.1:{port}",
        "AUTH_WORKERS": "1",
        "AUTH_METRICS_DIR": str(workdir / "metrics"),
        "AUTH_SERVICE_CLIENTS": json.dumps({"gateway": gateway_secret}),
        "AUTH_API_KEY_PEPPER_SECRET": secrets.token_urlsafe(24),
    }
    process = start_service("auth", env, port=port, log_dir=workdir)
    try:
        yield RealAuth(f"http://127.0.0.1:{port}", gateway_secret, prefix)
    finally:
        process.stop(signum=2)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().exchange_delete(f"{prefix}.events")
        connection.close()


@dataclass
class Account:
    """A user registered at the real auth, with an access token and an API key."""

    user_id: str
    access_token: str
    key: str
    key_id: str


def register(auth: RealAuth) -> Account:
    """Register a user, log in and create an API key (directly at auth)."""
    credentials = {"email": f"gw-{uuid.uuid4().hex[:10]}@example.com", "password": secrets.token_urlsafe(16)}
    created = requests.post(f"{auth.url}/auth/register", json=credentials, timeout=10)
    assert created.status_code == 201, created.text
    token = requests.post(f"{auth.url}/auth/token", json=credentials, timeout=10).json()["access_token"]
    key = requests.post(
        f"{auth.url}/auth/api-keys", json={"name": "gw"}, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert key.status_code == 201, key.text
    return Account(created.json()["id"], token, key.json()["key"], key.json()["id"])


@pytest.fixture
def gateway(settings: GatewaySettings, real_auth: RealAuth, amqp_url: str) -> Iterator[Any]:
    """The gateway app in process with auth = the real auth, listening to its identity events."""
    app = create_app(
        settings.model_copy(
            update={
                "auth_url": real_auth.url,
                "jwks_url": f"{real_auth.url}/.well-known/jwks.json",
                "client_secret": real_auth.gateway_secret,
                "revocation_events": True,
                "amqp_url": amqp_url,
                "amqp_prefix": real_auth.amqp_prefix,
            }
        )
    )
    state = app.extensions["parley_gateway"]
    assert state.listener.connected.wait(10), "the revocation listener did not connect"
    yield app
    state.close()


def test_api_key_is_exchanged_at_auth_for_its_owner(
    gateway: Any, real_auth: RealAuth, fake_stats: Callable[[], dict]
) -> None:
    """Both header styles work; the upstream gets a real auth token for the key's owner and key, never the key."""
    account = register(real_auth)
    client = gateway.test_client()
    forwarded = []
    for headers in ({"Authorization": f"Bearer {account.key}"}, {"x-api-key": account.key}):
        assert client.post(CHAT, data=BODY, headers=headers).status_code == 200
        seen = fake_stats()["last_request_headers"]
        assert account.key not in json.dumps(seen)
        forwarded.append(seen["authorization"].removeprefix("Bearer "))
    assert forwarded[0] == forwarded[1]  # exchanged once, then served from the cache
    claims = jwt.decode(forwarded[0], options={"verify_signature": False})
    assert (claims["sub"], claims["key_id"]) == (account.user_id, account.key_id)
    assert len(gateway.extensions["parley_gateway"].authenticator.exchanger.cache) == 1


def test_unknown_key_is_refused_by_auth(gateway: Any) -> None:
    """A well-formed key auth does not know: 401 in the OpenAI shape."""
    response = gateway.test_client().post(CHAT, data=BODY, headers={"x-api-key": "sk-pl-" + "Q" * 43})
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_api_key"


def test_revoking_a_key_at_auth_locks_it_out_within_seconds(gateway: Any, real_auth: RealAuth) -> None:
    """DELETE the key at auth: its key.revoked event empties the gateway's cache and the key is refused (≤ 5 s)."""
    account = register(real_auth)
    client = gateway.test_client()
    assert client.post(CHAT, data=BODY, headers={"x-api-key": account.key}).status_code == 200
    revoked = requests.delete(
        f"{real_auth.url}/auth/api-keys/{account.key_id}",
        headers={"Authorization": f"Bearer {account.access_token}"},
        timeout=10,
    )
    assert revoked.status_code == 204
    deadline = time.monotonic() + 5
    status = 200
    while time.monotonic() < deadline:
        status = client.post(CHAT, data=BODY, headers={"x-api-key": account.key}).status_code
        if status == 401:
            break
        time.sleep(0.05)
    assert status == 401
