"""The gateway app in process (Flask test client) in front of the real fake-provider process."""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
from flask.testing import FlaskClient

from parley_gateway import GatewaySettings, create_app
from parley_kit.testing import TokenMint, free_port, modules_loaded

CHAT = "/v1/chat/completions"


def chat(text: str, **extra: object) -> bytes:
    """A chat completion request body."""
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra})


def test_completion_passes_through(client: FlaskClient, bearer: dict[str, str]) -> None:
    """The upstream's answer comes back unchanged, with security headers and the request id."""
    response = client.post(
        CHAT, data=chat("hi"), headers={**bearer, "Content-Type": "application/json", "x-request-id": "my-req-1"}
    )
    assert response.status_code == 200
    assert response.json["object"] == "chat.completion"
    assert response.headers["x-request-id"] == "my-req-1"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "Server" not in response.headers


def test_stream_is_relayed_chunk_by_chunk(client: FlaskClient, bearer: dict[str, str]) -> None:
    """An SSE answer is a generator relay: chunks come out as they arrive (here 20 ms apart, so one by one; what
    arrives together may leave together) and the stream ends with [DONE]."""
    response = client.post(
        CHAT,
        data=chat("hi #fake:tokens=5 #fake:chunk_delay_ms=20", stream=True),
        headers={**bearer, "Content-Type": "application/json"},
        buffered=False,
    )
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    pieces = list(response.response)
    response.close()
    assert len(pieces) > 3
    assert b"data: [DONE]" in b"".join(pieces)


def test_upstream_traceparent_continues_the_callers_trace(
    client: FlaskClient, bearer: dict[str, str], fake_stats: Callable[[], dict]
) -> None:
    """The upstream gets a child span of the client's trace and the client's request id."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    client.post(
        CHAT,
        data=chat("hi"),
        headers={**bearer, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "x-request-id": "r-42"},
    )
    seen = fake_stats()["last_request_headers"]
    assert seen["traceparent"].split("-")[1] == trace_id
    assert seen["traceparent"].split("-")[2] != "00f067aa0ba902b7"
    assert seen["x-request-id"] == "r-42"


def test_missing_credentials_are_401_in_each_shape(client: FlaskClient) -> None:
    """No credentials: OpenAI shape on OpenAI routes, Anthropic shape on /v1/messages."""
    openai_style = client.post(CHAT, data=chat("hi"))
    assert openai_style.status_code == 401
    assert openai_style.json["error"]["type"] == "authentication_error"
    anthropic_style = client.post("/v1/messages", data=b"{}")
    assert anthropic_style.status_code == 401
    assert anthropic_style.json == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "no API key or access token was sent"},
    }


def test_upstream_down_is_503_in_anthropic_shape(settings: GatewaySettings, token_mint: TokenMint) -> None:
    """llm down: /v1/messages answers 503 overloaded_error at once."""
    app = create_app(settings.model_copy(update={"llm_url": f"http://127.0.0.1:{free_port()}"}))
    started = time.monotonic()
    response = app.test_client().post("/v1/messages", data=b"{}", headers={"x-api-key": token_mint.mint("user-1")})
    assert time.monotonic() - started < 2.0
    assert response.status_code == 503
    assert response.json["type"] == "error"
    assert response.json["error"]["type"] == "overloaded_error"


def test_api_key_with_auth_down_is_503(client: FlaskClient) -> None:
    """An API key cannot be checked while auth is down: 503, not 401 (the key may be fine)."""
    response = client.post(CHAT, data=chat("hi"), headers={"Authorization": "Bearer sk-pl-" + "A" * 43})
    assert response.status_code == 503
    assert response.json["error"]["type"] == "server_error"


def test_malformed_api_key_is_401_without_asking_auth(client: FlaskClient) -> None:
    """A key that cannot be one of ours (wrong shape) is refused locally, even with auth down."""
    response = client.post(CHAT, data=chat("hi"), headers={"Authorization": "Bearer sk-pl-short!"})
    assert response.status_code == 401


def test_probes_and_security_headers_on_flask_routes(client: FlaskClient) -> None:
    """/livez answers; /readyz says which dependency fails (auth is down here); both carry security headers."""
    live = client.get("/livez")
    assert live.status_code == 200
    assert live.headers["X-Content-Type-Options"] == "nosniff"
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json["checks"]["auth"].startswith("failing")


def test_readyz_ok_when_auth_llm_and_jobs_answer(settings: GatewaySettings, token_mint: TokenMint) -> None:
    """Ready once auth's, llm's and jobs' /livez answer (the JWKS stand-in answers any GET with 200)."""
    answering = token_mint.jwks_url.removesuffix("/.well-known/jwks.json")
    app = create_app(settings.model_copy(update={"auth_url": answering, "llm_url": answering}))
    not_ready = app.test_client().get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json["checks"] == {"auth": "ok", "llm": "ok", "jobs": "failing: ServiceUnavailable"}
    app = create_app(settings.model_copy(update={"auth_url": answering, "llm_url": answering, "jobs_url": answering}))
    assert app.test_client().get("/readyz").status_code == 200


def test_readyz_checks_redis_when_limits_use_it(
    settings: GatewaySettings, token_mint: TokenMint, redis_url: str, redis_prefix: str
) -> None:
    """With GATEWAY_REDIS_URL, Redis is one of the checks: ok when it answers, failing when it does not."""
    answering = token_mint.jwks_url.removesuffix("/.well-known/jwks.json")
    base = settings.model_copy(
        update={"auth_url": answering, "llm_url": answering, "jobs_url": answering, "redis_prefix": redis_prefix}
    )
    ready = create_app(base.model_copy(update={"redis_url": redis_url})).test_client().get("/readyz")
    assert (ready.status_code, ready.json["checks"]["redis"]) == (200, "ok")
    down = f"redis://127.0.0.1:{free_port()}/0"
    not_ready = create_app(base.model_copy(update={"redis_url": down})).test_client().get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json["checks"]["redis"].startswith("failing")


def test_unknown_route_is_404_problem_json(client: FlaskClient) -> None:
    """Outside /v1 errors are problem+json."""
    response = client.get("/auth/internal/act-as")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"


def test_the_gateway_never_loads_a_database_library() -> None:
    """The gateway owns no database: a worker that loaded SQLAlchemy anyway (the kit's error handlers once did)
    carried ~11 MB more for nothing."""
    assert modules_loaded("import parley_gateway; parley_gateway.create_app()", ("sqlalchemy", "psycopg")) == []
