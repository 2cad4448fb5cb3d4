"""The error vocabulary: each body shape, and every failure of an app built with `create_service_app`."""

from __future__ import annotations

import json

import pytest
from flask.testing import FlaskClient
from kit_sample_app import SampleSettings, create_app, shape_for_path
from pydantic import BaseModel, ValidationError

from parley_kit import errors
from parley_kit.errors import ErrorShape


def test_provider_api_shape_by_path() -> None:
    """Anthropic on /v1/messages…, OpenAI on the rest of /v1, problem+json elsewhere (the gateway's and llm's)."""
    assert errors.provider_api_shape("/v1/messages") is ErrorShape.ANTHROPIC
    assert errors.provider_api_shape("/v1/messages/batches") is ErrorShape.ANTHROPIC
    assert errors.provider_api_shape("/v1/chat/completions") is ErrorShape.OPENAI
    assert errors.provider_api_shape("/v1/nothing") is ErrorShape.OPENAI
    assert errors.provider_api_shape("/v1") is ErrorShape.OPENAI
    assert errors.provider_api_shape("/auth/token") is ErrorShape.PROBLEM
    assert errors.provider_api_shape("/readyz") is ErrorShape.PROBLEM


def test_openai_shape() -> None:
    body = errors.error_body(ErrorShape.OPENAI, errors.BadRequest("model is required", param="model"))
    assert body == {
        "error": {
            "message": "model is required",
            "type": "invalid_request_error",
            "param": "model",
            "code": "invalid_request",
        }
    }


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (errors.Unauthorized(), "authentication_error"),
        (errors.Forbidden(), "permission_error"),
        (errors.NotFound(), "invalid_request_error"),
        (errors.RateLimited(), "rate_limit_error"),
        (errors.BudgetExceeded(), "insufficient_quota"),
        (errors.UpstreamError(), "server_error"),
        (errors.GatewayTimeout(), "server_error"),
        (errors.ParleyError(), "server_error"),
    ],
)
def test_openai_types(error: errors.ParleyError, kind: str) -> None:
    assert errors.error_body(ErrorShape.OPENAI, error)["error"]["type"] == kind


def test_anthropic_shape() -> None:
    body = errors.error_body(ErrorShape.ANTHROPIC, errors.NotFound("no such model"))
    assert body == {"type": "error", "error": {"type": "not_found_error", "message": "no such model"}}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, "authentication_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (503, "overloaded_error"),
        (405, "invalid_request_error"),
        (500, "api_error"),
        (502, "api_error"),
    ],
)
def test_anthropic_types(status: int, kind: str) -> None:
    error = errors.ParleyError("x")
    error.status = status
    assert errors.error_body(ErrorShape.ANTHROPIC, error)["error"]["type"] == kind


def test_problem_shape_and_media_type() -> None:
    error = errors.Conflict("already exists", code="duplicate", errors=[{"loc": "name", "msg": "taken"}])
    body = errors.error_body(ErrorShape.PROBLEM, error)
    assert body == {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": "already exists",
        "code": "duplicate",
        "errors": [{"loc": "name", "msg": "taken"}],
    }
    response = errors.error_response(ErrorShape.PROBLEM, errors.RateLimited(headers={"Retry-After": "7"}))
    assert response.status_code == 429
    assert response.mimetype == "application/problem+json"
    assert response.headers["Retry-After"] == "7"
    assert errors.error_response(ErrorShape.OPENAI, errors.RateLimited()).mimetype == "application/json"


def test_error_defaults_to_its_title() -> None:
    error = errors.ServiceUnavailable()
    assert (error.status, error.code, error.detail, str(error)) == (
        503,
        "service_unavailable",
        "Service Unavailable",
        "Service Unavailable",
    )


def test_validation_error_names_fields_without_echoing_input() -> None:
    class Body(BaseModel):
        api_key: int

    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"api_key": "sk-secret-value"})
    error = errors.validation_error(caught.value)
    assert error.status == 400
    assert error.param == "api_key"
    assert error.detail.startswith("api_key: ")
    assert "sk-secret-value" not in json.dumps(errors.error_body(ErrorShape.PROBLEM, error))


# ----- an app built with create_service_app -----------------------------------------------------------------------


@pytest.fixture
def client() -> FlaskClient:
    """A test client of the sample service."""
    return create_app(SampleSettings()).test_client()


PREFIXES = {
    "/v1/items": ErrorShape.PROBLEM,
    "/v1/chat/completions": ErrorShape.OPENAI,
    "/v1/messages": ErrorShape.ANTHROPIC,
}


def assert_shape(response, shape: ErrorShape, status: int) -> dict:  # type: ignore[no-untyped-def]
    """Check the status, media type and envelope of an error response; return its message fields."""
    assert response.status_code == status
    body = response.get_json(force=True)
    if shape is ErrorShape.PROBLEM:
        assert response.mimetype == "application/problem+json"
        assert body["status"] == status
        return body
    assert response.mimetype == "application/json"
    if shape is ErrorShape.OPENAI:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def test_shape_for_path_picks_the_routes_api() -> None:
    assert [shape_for_path(p) for p in PREFIXES] == list(PREFIXES.values())


@pytest.mark.parametrize(("prefix", "shape"), PREFIXES.items())
def test_unhandled_exception_is_a_bare_500(client: FlaskClient, prefix: str, shape: ErrorShape) -> None:
    response = client.get(f"{prefix}/boom")
    fields = assert_shape(response, shape, 500)
    text = response.get_data(as_text=True)
    for leak in ("secret-token-abc", "/srv/parley", "Traceback", "RuntimeError", "line 12"):
        assert leak not in text
    assert "Internal Server Error" in json.dumps(fields)


@pytest.mark.parametrize(("prefix", "shape"), PREFIXES.items())
def test_a_database_that_cannot_be_reached_is_a_503_to_retry_not_a_500(
    client: FlaskClient, prefix: str, shape: ErrorShape, caplog: pytest.LogCaptureFixture
) -> None:
    """A database down or restarting (connection refused) is an outage the client may retry through, in the route's
    shape, logged as a warning: not "unhandled error" and a 500 that reads as our bug."""
    response = client.get(f"{prefix}/database-down")
    fields = assert_shape(response, shape, 503)
    assert response.headers["Retry-After"] == "1"
    assert "database unavailable" in json.dumps(fields)
    assert "127.0.0.1" not in response.get_data(as_text=True)
    assert [(r.levelname, r.message) for r in caplog.records if r.name == "parley_kit.errors"] == [
        ("WARNING", "database unavailable")
    ]


@pytest.mark.parametrize(("prefix", "shape"), PREFIXES.items())
def test_parley_error_keeps_status_and_headers(client: FlaskClient, prefix: str, shape: ErrorShape) -> None:
    response = client.get(f"{prefix}/conflict")
    fields = assert_shape(response, shape, 409)
    assert response.headers["Retry-After"] == "3"
    assert "already there" in json.dumps(fields)


@pytest.mark.parametrize(("prefix", "shape"), PREFIXES.items())
def test_unknown_route_is_404(client: FlaskClient, prefix: str, shape: ErrorShape) -> None:
    fields = assert_shape(client.get(f"{prefix}/nope/nothing"), shape, 404)
    if shape is ErrorShape.OPENAI:
        assert fields["code"] == "not_found"
    if shape is ErrorShape.ANTHROPIC:
        assert fields["type"] == "not_found_error"


@pytest.mark.parametrize(("prefix", "shape"), PREFIXES.items())
def test_wrong_method_is_405_with_allow(client: FlaskClient, prefix: str, shape: ErrorShape) -> None:
    response = client.delete(prefix)
    assert_shape(response, shape, 405)
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize(("prefix", "shape"), PREFIXES.items())
def test_validation_error_is_400_naming_the_field(client: FlaskClient, prefix: str, shape: ErrorShape) -> None:
    response = client.post(prefix, json={"name": "widget", "quantity": 0})
    fields = assert_shape(response, shape, 400)
    assert "quantity" in json.dumps(fields)
    if shape is ErrorShape.OPENAI:
        assert fields["param"] == "quantity" and fields["type"] == "invalid_request_error"
    if shape is ErrorShape.PROBLEM:
        assert fields["errors"][0]["loc"] == "quantity"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"string"', b"", b"\xff\xfe"],
)
def test_malformed_bodies_are_400_not_500(client: FlaskClient, body: bytes) -> None:
    response = client.post("/v1/items", data=body, content_type="application/json")
    assert_shape(response, ErrorShape.PROBLEM, 400)


def test_valid_request_passes(client: FlaskClient) -> None:
    response = client.post("/v1/items", json={"name": "widget", "quantity": 2})
    assert response.status_code == 201
    assert response.get_json() == {"name": "widget", "quantity": 2}


def test_path_parameter_validation_is_400(client: FlaskClient) -> None:
    assert_shape(client.get(f"/v1/items/{'x' * 65}"), ErrorShape.PROBLEM, 400)


def _raised(url: str, statement: str) -> Exception:
    from sqlalchemy import create_engine, text

    try:
        with create_engine(url).connect() as connection:
            connection.execute(text(statement))
    except Exception as exc:  # noqa: BLE001 - the error is what is looked at
        return exc
    raise AssertionError("no error")


def test_only_a_database_that_cannot_serve_now_is_unavailable() -> None:
    """Refused, locked or out of connections: an outage to retry (503). A statement the database rejects is a bug
    (500, with its traceback logged), even when the driver files it under OperationalError (SQLite's "no such
    table")."""
    assert errors.database_unavailable(_raised("postgresql+psycopg://parley@127.0.0.1:1/parley", "SELECT 1"))
    assert not errors.database_unavailable(_raised("sqlite://", "SELECT * FROM no_such_table"))
    assert not errors.database_unavailable(RuntimeError("not a database error"))
