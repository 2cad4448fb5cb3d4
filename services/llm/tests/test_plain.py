"""The plain-call layer (`parley_llm.plain`): admitted non-streamed calls skip Flask and are answered exactly as the
Flask views answer them; everything else reaches Flask untouched."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from flask import request_started
from werkzeug.test import Client as WsgiClient

from parley_kit.testing import TokenMint

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
EMBEDDINGS = "/v1/embeddings"


def chat(text: str = "hello there friend", **extra: object) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def message(text: str = "hello there friend", **extra: object) -> dict[str, Any]:
    return {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


# (name, path, body as bytes or JSON, extra headers): plain calls, calls that fail once admitted, and requests the
# layer hands to Flask. A renamed model and a budget's reservation, settlement and 429 go through the layer in
# test_budgets.py (its `dime-*` models).
CASES = [
    ("chat", CHAT, chat(), {}),
    ("messages with beta", MESSAGES, message(), {"anthropic-beta": "tools-2024-04-04"}),
    ("embeddings", EMBEDDINGS, {"model": "text-embedding-3-small", "input": "two words"}, {}),
    ("upstream 429", CHAT, chat("x #fake:error=429 #fake:retry_after=7"), {}),
    ("upstream 503 (messages)", MESSAGES, message("x #fake:error=503"), {}),
    ("upstream garbage", CHAT, chat("x #fake:garbage"), {}),
    ("max_tokens over the ceiling", CHAT, chat(max_tokens=10**9), {}),
    ("unknown model", CHAT, chat(model="no-such-model"), {}),
    ("embedding model for chat", CHAT, chat(model="text-embedding-3-small"), {}),
    ("invalid body", MESSAGES, {"model": "claude-3-5-haiku-latest", "messages": []}, {}),
    ("not JSON", CHAT, b'{"model": ', {}),
    ("JSON array", CHAT, b"[1, 2]", {}),
    (
        "NaN (stdlib JSON only)",
        CHAT,
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "temperature": NaN}',
        {},
    ),
    ("text/plain", CHAT, orjson.dumps(chat()), {"Content-Type": "text/plain"}),
    ("no token", CHAT, chat(), {"Authorization": ""}),
    ("bad token", CHAT, chat(), {"Authorization": "Bearer not.a.jwt"}),
    ("other family (translated)", CHAT, chat(model="claude-3-5-haiku-latest"), {}),
]
# What differs between two answers of the fake provider (ids, clocks) and of the service (trace ids).
VOLATILE_FIELDS = {"id", "created", "system_fingerprint"}
VOLATILE_HEADERS = {"x-request-id", "date"}


def send(client: WsgiClient, path: str, body: Any, headers: dict[str, str], token: str) -> Any:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **headers}
    sent = {name: value for name, value in sent.items() if value}
    return client.post(path, data=data, headers=sent, buffered=True)


def comparable(response: Any) -> tuple[int, dict[str, str], Any]:
    headers = {k.lower(): v for k, v in response.headers.items() if k.lower() not in VOLATILE_HEADERS}
    if headers.get("content-type", "").endswith("json"):
        body = orjson.loads(response.data)
        if isinstance(body, dict):
            body = {k: v for k, v in body.items() if k not in VOLATILE_FIELDS}
            headers.pop("content-length", None)  # the ids are of varying length
    else:
        body = response.data
    return response.status_code, headers, body


@pytest.fixture
def flask_requests(app):  # type: ignore[no-untyped-def]
    """How many requests Flask itself handled while the test ran."""
    seen: list[str] = []

    def count(_sender: object, **_extra: object) -> None:
        seen.append("request")

    request_started.connect(count, app)
    yield seen
    request_started.disconnect(count, app)


@pytest.mark.parametrize(("name", "path", "body", "headers"), CASES, ids=[case[0] for case in CASES])
def test_plain_layer_answers_as_flask_does(app, token_mint: TokenMint, user: str, name, path, body, headers) -> None:  # type: ignore[no-untyped-def]
    token = token_mint.mint(user, key_id="key-1")
    through_layer = send(app.test_client(), path, body, headers, token)
    flask_alone = WsgiClient(app.wsgi_app._app)  # the Flask app the layer falls back to
    assert comparable(through_layer) == comparable(send(flask_alone, path, body, headers, token)), name
    assert through_layer.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "body", "headers", "by_flask"),
    [
        (CHAT, chat(), {}, 0),
        (MESSAGES, message(), {}, 0),
        (CHAT, chat("x #fake:error=503"), {}, 0),  # admitted, then failed upstream: still the layer's
        (CHAT, chat(), {"Idempotency-Key": "plain-test-key"}, 0),
        (CHAT, chat(), {"Idempotency-Key": "k" * 256}, 1),  # too long: Flask's 400
        (CHAT, chat(stream=True), {}, 1),
        (CHAT, chat(model="claude-3-5-haiku-latest"), {}, 1),
        (CHAT, chat(model="no-such-model"), {}, 1),
        (CHAT, chat(), {"Authorization": "Bearer not.a.jwt"}, 1),
    ],
)
def test_only_admitted_plain_calls_skip_flask(
    app, token_mint: TokenMint, user: str, flask_requests, path, body, headers, by_flask
) -> None:  # type: ignore[no-untyped-def]
    token = token_mint.mint(user, key_id="key-1")
    send(app.test_client(), path, body, headers, token)
    assert len(flask_requests) == by_flask


def test_idempotency_keys_through_the_layer_as_through_flask(app, token_mint: TokenMint, user: str) -> None:  # type: ignore[no-untyped-def]
    """First call, replay, the key reused with another body, and a failed call's key released: alike both ways."""
    token = token_mint.mint(user, key_id="key-1")
    seen = {}
    for name, client in (("layer", app.test_client()), ("flask", WsgiClient(app.wsgi_app._app))):
        key = {"Idempotency-Key": f"{name}-{user}"}
        failing = {"Idempotency-Key": f"{name}-failing-{user}"}
        answers = [
            send(client, CHAT, chat(), key, token),
            send(client, CHAT, chat(), key, token),
            send(client, CHAT, chat("another prompt"), key, token),
            send(client, CHAT, chat("x #fake:error=400"), failing, token),
            send(client, CHAT, chat("x #fake:error=400"), failing, token),  # released: runs again
        ]
        assert answers[1].headers.get("Idempotent-Replayed") == "true"
        assert answers[1].data == answers[0].data
        seen[name] = [comparable(answer) for answer in answers]
    assert [status for status, _, _ in seen["layer"]] == [200, 200, 409, 400, 400]
    assert seen["layer"] == seen["flask"]


def test_plain_calls_are_charged_once_after_the_answer(app, token_mint: TokenMint, user: str, rows) -> None:  # type: ignore[no-untyped-def]
    token = token_mint.mint(user, key_id="key-1")
    ok = send(app.test_client(), CHAT, chat(), {}, token)
    failed = send(app.test_client(), CHAT, chat("x #fake:error=503"), {}, token)
    assert (ok.status_code, failed.status_code) == (200, 502)
    written = rows()
    assert [(row["status"], row["request_id"]) for row in written] == [
        ("ok", ok.headers["x-request-id"]),
        ("error", failed.headers["x-request-id"]),
    ]
    assert written[0]["input_tokens"] == orjson.loads(ok.data)["usage"]["prompt_tokens"]
