"""API keys against a STAND-IN auth: only what the real auth cannot be made to show.

The exchange itself (both header styles, the owner's token upstream, unknown keys, revocation by a real key.revoked
event) is tested against the real auth process in test_real_auth.py. This stand-in stays for: counting exchanges
(caching and the refusal cache are about how often auth is asked), and auth forgetting the gateway's service token
(the refresh-and-retry path), which a running auth never does on demand. The broker is the real RabbitMQ.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
import pytest

from parley_gateway import GatewaySettings, create_app
from parley_kit.amqp import Publisher
from parley_kit.testing import TokenMint

KEY = "sk-pl-" + "k" * 43
CHAT = "/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


class StandInAuth:
    """Answers /auth/service-token and /auth/internal/key-exchange as the design says, counting calls."""

    def __init__(self, token_mint: TokenMint) -> None:
        self.service_tokens_issued = 0
        self.exchanges = 0
        self.valid_service_tokens: set[str] = set()
        self.user_tokens: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/auth/service-token":
                    assert body == {"client_id": "gateway", "client_secret": "s3cret-for-tests"}
                    stand_in.service_tokens_issued += 1
                    token = f"svc-{stand_in.service_tokens_issued}"
                    stand_in.valid_service_tokens.add(token)
                    self._answer(200, {"access_token": token, "token_type": "Bearer", "expires_in": 300})
                elif self.path == "/auth/internal/key-exchange":
                    stand_in.exchanges += 1
                    service_token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    if service_token not in stand_in.valid_service_tokens:
                        self._answer(401, {"status": 401, "code": "invalid_token"})
                    elif body.get("key") != KEY:
                        self._answer(401, {"status": 401, "code": "invalid_api_key"})
                    else:
                        token = token_mint.mint("u1", key_id="k1")
                        stand_in.user_tokens.append(token)
                        self._answer(200, {"access_token": token, "expires_in": 600, "user_id": "u1", "key_id": "k1"})
                else:
                    self._answer(404, {})

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def auth(token_mint: TokenMint) -> Iterator[StandInAuth]:
    """A fresh stand-in auth."""
    stand_in = StandInAuth(token_mint)
    yield stand_in
    stand_in.close()


@pytest.fixture
def key_settings(settings: GatewaySettings, auth: StandInAuth) -> GatewaySettings:
    """Settings pointing auth at the stand-in."""
    return settings.model_copy(update={"auth_url": auth.url, "client_secret": "s3cret-for-tests"})


def test_key_is_exchanged_once_and_cached(
    key_settings: GatewaySettings, auth: StandInAuth, fake_stats: Callable[[], dict]
) -> None:
    """The first request exchanges the key; the next ones reuse the cached token; upstream sees that token."""
    client = create_app(key_settings).test_client()
    for header in ({"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        assert client.post(CHAT, data=BODY, headers=header).status_code == 200
    assert (auth.service_tokens_issued, auth.exchanges) == (1, 1)
    seen = fake_stats()["last_request_headers"]
    assert seen["authorization"] == f"Bearer {auth.user_tokens[0]}"
    assert KEY not in json.dumps(seen)


def test_unknown_key_is_401_and_not_asked_again_at_once(key_settings: GatewaySettings, auth: StandInAuth) -> None:
    """auth refuses the key: 401, and a repeat within the refusal TTL does not reach auth."""
    client = create_app(key_settings).test_client()
    other = "sk-pl-" + "z" * 43
    for _ in range(3):
        response = client.post(CHAT, data=BODY, headers={"Authorization": f"Bearer {other}"})
        assert response.status_code == 401
        assert response.json["error"]["code"] == "invalid_api_key"
    assert auth.exchanges == 1


def test_refused_service_token_is_refreshed_once(key_settings: GatewaySettings, auth: StandInAuth) -> None:
    """auth forgot our service token (restart, key rotation): one refresh and retry, then success."""
    client = create_app(key_settings).test_client()
    assert client.post(CHAT, data=BODY, headers={"x-api-key": KEY}).status_code == 200
    auth.valid_service_tokens.clear()
    client.application.extensions["parley_gateway"].authenticator.exchanger.cache.clear()
    assert client.post(CHAT, data=BODY, headers={"x-api-key": KEY}).status_code == 200
    assert auth.service_tokens_issued == 2
    assert auth.exchanges == 3


def test_key_revoked_event_drops_the_cached_token(
    key_settings: GatewaySettings, auth: StandInAuth, amqp_url: str, amqp_prefix: str
) -> None:
    """A key.revoked on auth's topic exchange empties the cache at once: the next request asks auth again."""
    app = create_app(
        key_settings.model_copy(update={"revocation_events": True, "amqp_url": amqp_url, "amqp_prefix": amqp_prefix})
    )
    gateway = app.extensions["parley_gateway"]
    try:
        assert gateway.listener.connected.wait(10), "the revocation listener did not connect"
        client = app.test_client()
        assert client.post(CHAT, data=BODY, headers={"x-api-key": KEY}).status_code == 200
        cache = gateway.authenticator.exchanger.cache
        assert len(cache) == 1
        publisher = Publisher(amqp_url)
        publisher.publish(f"{amqp_prefix}.events", "key.revoked", "key.revoked", {"key_id": "k1", "user_id": "u1"})
        publisher.close()
        deadline = time.monotonic() + 5
        while len(cache) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(cache) == 0
        assert client.post(CHAT, data=BODY, headers={"x-api-key": KEY}).status_code == 200
        assert auth.exchanges == 2
    finally:
        gateway.close()
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().exchange_delete(f"{amqp_prefix}.events")
        connection.close()
