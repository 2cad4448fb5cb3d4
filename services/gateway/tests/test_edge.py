"""CORS at the edge and /docs (the gateway app in process; a small OpenAPI stand-in plays the services' documents)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flask.testing import FlaskClient

from parley_gateway import GatewaySettings, create_app

CHAT = "/v1/chat/completions"
ALLOWED = "https://app.example.com"


@pytest.fixture
def cors_client(settings: GatewaySettings) -> Iterator[FlaskClient]:
    """The app with one allowed origin."""
    app = create_app(settings.model_copy(update={"cors_origins": f"{ALLOWED}, https://other.example.com/"}))
    yield app.test_client()
    app.extensions["parley_gateway"].close()


def preflight(client: FlaskClient, origin: str, path: str = CHAT) -> object:
    """A browser's preflight for a POST with Authorization and Content-Type."""
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_preflight_from_an_allowed_origin_is_answered_at_the_edge(
    cors_client: FlaskClient, fake_stats: Callable[[], dict]
) -> None:
    """204 with the allow headers, without credentials and without reaching the upstream."""
    before = sum(fake_stats()["requests"].values())
    response = preflight(cors_client, ALLOWED)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert response.headers["Access-Control-Max-Age"] == "600"
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert sum(fake_stats()["requests"].values()) == before
    # the trailing slash in the setting does not matter
    assert preflight(cors_client, "https://other.example.com").status_code == 204


def test_preflight_from_another_origin_is_refused(cors_client: FlaskClient) -> None:
    """An origin off the list gets 403 and no allow headers."""
    response = preflight(cors_client, "https://evil.example.com")
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers


def test_answers_to_allowed_origins_carry_cors_headers(cors_client: FlaskClient, bearer: dict[str, str]) -> None:
    """A proxied answer and an error both name the origin and expose the rate-limit and request-id headers."""
    ok = cors_client.post(CHAT, data=b'{"model":"gpt-4o-mini","messages":[]}', headers={**bearer, "Origin": ALLOWED})
    assert ok.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "x-ratelimit-remaining-requests" in ok.headers["Access-Control-Expose-Headers"]
    assert ok.headers["Vary"] == "Origin"
    refused = cors_client.post(CHAT, data=b"{}", headers={"Origin": ALLOWED})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == ALLOWED
    other = cors_client.post(CHAT, data=b"{}", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_no_cors_without_an_allow_list(client: FlaskClient) -> None:
    """Default settings: no CORS headers at all; a preflight is not special (401: no credentials)."""
    response = preflight(client, ALLOWED)
    assert "Access-Control-Allow-Origin" not in response.headers


class OpenApiStandIn:
    """Serves `/openapi/openapi.json` for one made-up service, counting fetches; can be told to fail."""

    def __init__(self) -> None:
        self.fetches = 0
        self.failing = False
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.fetches += 1
                if stand_in.failing or self.path != "/openapi/openapi.json":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(
                    {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": {"/auth/x": {}}}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

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
def openapi_stand_in() -> Iterator[OpenApiStandIn]:
    """A fresh stand-in."""
    server = OpenApiStandIn()
    yield server
    server.close()


def test_docs_page_lists_every_service(client: FlaskClient) -> None:
    """Swagger UI, with the selector's three entries, served from the gateway's own assets."""
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    for service in ("auth", "llm", "jobs"):
        assert f'"url":"/docs/{service}.json","name":"{service}"' in text
    assets = client.get("/openapi/swagger/js/swagger-ui-bundle.js")
    assets.close()  # a file response: closed, or its file handle outlives the test
    assert assets.status_code == 200


def test_docs_documents_are_fetched_once_and_cached(
    settings: GatewaySettings, openapi_stand_in: OpenApiStandIn
) -> None:
    """A service's document is fetched on first use, then served from the cache; a stale copy beats a failing
    service; an unknown name is 400; a service never fetched and down is 503 (problem+json)."""
    app = create_app(settings.model_copy(update={"auth_url": openapi_stand_in.url, "docs_cache_ttl": 0.0}))
    client = app.test_client()
    first = client.get("/docs/auth.json")
    assert first.status_code == 200
    assert first.json["paths"] == {"/auth/x": {}}  # a path the gateway routes (the others are left out)
    openapi_stand_in.failing = True
    stale = client.get("/docs/auth.json")  # ttl 0: refetched, fails, the cached copy is served
    assert stale.status_code == 200 and stale.json == first.json
    assert openapi_stand_in.fetches == 2
    cached_app = create_app(settings.model_copy(update={"auth_url": openapi_stand_in.url}))
    openapi_stand_in.failing = False
    cached = cached_app.test_client()
    assert cached.get("/docs/auth.json").status_code == 200
    assert cached.get("/docs/auth.json").status_code == 200
    assert openapi_stand_in.fetches == 3  # one fetch for two answers
    assert cached.get("/docs/nope.json").status_code == 400
    down = cached.get("/docs/jobs.json")  # jobs is down in these settings
    assert down.status_code == 503
    assert down.mimetype == "application/problem+json"
