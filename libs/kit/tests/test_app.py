"""The common factory steps in process: request ids, trace continuation, RED metrics by route, health probes."""

from __future__ import annotations

import json

import pytest
from flask.testing import FlaskClient
from kit_sample_app import SampleSettings, create_app
from prometheus_client import REGISTRY

from parley_kit import tracing
from parley_kit.health import Health

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def app():  # type: ignore[no-untyped-def]
    """The sample service app."""
    return create_app(SampleSettings())


@pytest.fixture
def client(app) -> FlaskClient:  # type: ignore[no-untyped-def]
    """Its test client."""
    return app.test_client()


def count_of(method: str, route: str, status: str) -> float:
    """Requests observed so far for one label set."""
    labels = {"http_request_method": method, "http_route": route, "http_response_status_code": status}
    return REGISTRY.get_sample_value("http_server_request_duration_seconds_count", labels) or 0.0


def test_request_id_is_echoed_or_made(client: FlaskClient) -> None:
    assert client.get("/v1/items/a", headers={"x-request-id": "client-77"}).headers["x-request-id"] == "client-77"
    made = client.get("/v1/items/a", headers={"x-request-id": "bad\x01id"}).headers["x-request-id"]
    assert made.startswith("req_") and len(made) == 28


def test_request_continues_the_callers_trace(capsys: pytest.CaptureFixture[str]) -> None:
    app = create_app(SampleSettings())  # built in the test body, so its stdout log handler writes into capsys
    response = app.test_client().get("/v1/items/a", headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"})
    assert response.headers["x-request-id"] == f"req_{TRACE[:24]}"
    access = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"parley.access"' in line]
    assert access[-1]["trace"]["id"] == TRACE
    assert access[-1]["url"]["path"] == "/v1/items/a"
    assert access[-1]["http"]["response"]["status_code"] == 200
    assert access[-1]["event"]["outcome"] == "success" and access[-1]["event"]["duration"] > 0
    assert tracing.current() is None  # cleared at teardown


def test_metrics_count_by_route_template(client: FlaskClient) -> None:
    before = count_of("GET", "/v1/items/<item_id>", "200")
    for item in ("a", "b", "c"):
        assert client.get(f"/v1/items/{item}").status_code == 200
    assert count_of("GET", "/v1/items/<item_id>", "200") == before + 3
    unmatched = count_of("GET", "unmatched", "404")
    client.get("/no/such/path/123")
    assert count_of("GET", "unmatched", "404") == unmatched + 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'http_route="/v1/items/<item_id>"' in text
    assert "/v1/items/a" not in text and "/no/such/path" not in text


def test_errors_are_counted_with_their_status(client: FlaskClient) -> None:
    before = count_of("GET", "/v1/items/boom", "500")
    client.get("/v1/items/boom")
    assert count_of("GET", "/v1/items/boom", "500") == before + 1


def test_livez(client: FlaskClient) -> None:
    response = client.get("/livez")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_readyz_all_ok(app, client: FlaskClient) -> None:  # type: ignore[no-untyped-def]
    health: Health = app.extensions["parley_health"]
    health.add_check("database", lambda: None)
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "checks": {"database": "ok"}}


def test_readyz_failing_check_is_503_without_the_exception_text(app, client: FlaskClient) -> None:  # type: ignore[no-untyped-def]
    def broker() -> None:
        raise ConnectionRefusedError("amqp://admin:hunter2@rabbit:5672 refused")

    health: Health = app.extensions["parley_health"]
    health.add_check("database", lambda: None)
    health.add_check("broker", broker)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "broker": "failing: ConnectionRefusedError"},
    }
    assert "hunter2" not in response.get_data(as_text=True)


def test_openapi_documents_the_routes(client: FlaskClient) -> None:
    spec = client.get("/openapi/openapi.json").get_json()
    assert "/v1/items/{item_id}" in spec["paths"]
    assert "ItemBody" in json.dumps(spec["components"])
