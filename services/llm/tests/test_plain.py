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


# (name, path, body as bytes or JSON, extra headers, answered by Flask): plain calls, calls that fail once admitted,
# and requests the layer hands to Flask. A renamed model and a budget's reservation, settlement and 429 go through the
# layer in test_budgets.py (its `dime-*` models).
EMBED = {"model": "text-embedding-3-small", "input": "two words"}
CASES = [
    ("chat", CHAT, chat(), {}, 0),
    ("messages with beta", MESSAGES, message(), {"anthropic-beta": "tools-2024-04-04"}, 0),
    ("embeddings", EMBEDDINGS, EMBED, {}, 0),
    ("embeddings ignore a key", EMBEDDINGS, EMBED, {"Idempotency-Key": "chat-key"}, 0),
    ("upstream 429", CHAT, chat("x #fake:error=429 #fake:retry_after=7"), {}, 0),
    ("upstream 503 (messages)", MESSAGES, message("x #fake:error=503"), {}, 0),
    ("upstream garbage", CHAT, chat("x #fake:garbage"), {}, 0),
    ("max_tokens over the ceiling", CHAT, chat(max_tokens=10**9), {}, 1),
    ("unknown model", CHAT, chat(model="no-such-model"), {}, 1),
    ("embedding model for chat", CHAT, chat(model="text-embedding-3-small"), {}, 1),
    ("invalid body", MESSAGES, {"model": "claude-3-5-haiku-latest", "messages": []}, {}, 1),
    ("not JSON", CHAT, b'{"model": ', {}, 1),
    ("JSON array", CHAT, b"[1, 2]", {}, 1),
    ("JSON string holding an object", EMBEDDINGS, orjson.dumps(orjson.dumps(EMBED).decode()), {}, 1),
    ("NaN (stdlib JSON only)", CHAT, b'{"model": "gpt-4o-mini", "messages": [{"role": "user"}], "top_p": NaN}', {}, 1),
    ("text/plain", CHAT, orjson.dumps(chat()), {"Content-Type": "text/plain"}, 1),
    ("no token", CHAT, chat(), {"Authorization": ""}, 1),
    ("bad token", CHAT, chat(), {"Authorization": "Bearer not.a.jwt"}, 1),
    ("other family (translated)", CHAT, chat(model="claude-3-5-haiku-latest"), {}, 1),
    ("stream", CHAT, chat(stream=True), {}, 1),
    ("key too long", CHAT, chat(), {"Idempotency-Key": "k" * 256}, 1),
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
    elif headers.get("content-type", "").startswith("text/event-stream"):  # each event without its ids
        body = [
            {k: v for k, v in orjson.loads(line[6:]).items() if k not in VOLATILE_FIELDS}
            if line.startswith(b"data: {")
            else line
            for line in response.data.split(b"\n")
        ]
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


@pytest.mark.parametrize(("name", "path", "body", "headers", "by_flask"), CASES, ids=[case[0] for case in CASES])
def test_plain_layer_answers_as_flask_does(
    app, token_mint: TokenMint, user: str, flask_requests, name, path, body, headers, by_flask
) -> None:  # type: ignore[no-untyped-def]
    """Each request is answered by the layer or handed to Flask, as expected, and alike either way."""
    token = token_mint.mint(user, key_id="key-1")
    if "Idempotency-Key" in headers and path == EMBEDDINGS:  # the key is taken by a chat call first
        send(WsgiClient(app.wsgi_app._app), CHAT, chat(), headers, token)
    flask_requests.clear()
    through_layer = send(app.test_client(), path, body, headers, token)
    assert len(flask_requests) == by_flask, f"{name}: answered by {'Flask' if flask_requests else 'the layer'}"
    flask_alone = WsgiClient(app.wsgi_app._app)  # the Flask app the layer falls back to
    assert comparable(through_layer) == comparable(send(flask_alone, path, body, headers, token)), name
    assert through_layer.headers["x-request-id"]


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
    """The row is written when the answer is closed (sent), not before; a failed call is booked as an error."""
    token = token_mint.mint(user, key_id="key-1")
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    ok = client.post(CHAT, json=chat(), headers=headers, buffered=False)
    assert ok.status_code == 200 and rows() == []
    ok.close()
    failed = client.post(CHAT, json=chat("x #fake:error=503"), headers=headers, buffered=False)
    assert failed.status_code == 502 and len(rows()) == 1
    failed.close()
    written = rows()
    assert [(row["status"], row["request_id"]) for row in written] == [
        ("ok", ok.headers["x-request-id"]),
        ("error", failed.headers["x-request-id"]),
    ]
    assert written[0]["input_tokens"] == orjson.loads(ok.data)["usage"]["prompt_tokens"]
