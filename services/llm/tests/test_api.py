"""Service tests: the Flask test client against PostgreSQL and the real fake provider."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from parley_kit.testing import free_port

CHAT = "/v1/chat/completions"


def chat(text: str = "hello there friend", **extra: object) -> dict:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def message(text: str = "hello there friend", **extra: object) -> dict:
    return {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def sse_data(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_chat_non_stream_passes_the_provider_answer_and_charges_it(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat(tools=[{"type": "function", "function": {"name": "f"}}], temperature=0.2))
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    [row] = rows()
    assert row["status"] == "ok" and row["operation"] == "chat" and row["provider"] == "openai"
    assert row["input_tokens"] == body["usage"]["prompt_tokens"]
    assert row["output_tokens"] == body["usage"]["completion_tokens"]
    expected = (Decimal("0.15") * row["input_tokens"] + Decimal("0.60") * row["output_tokens"]) / 1_000_000
    assert row["cost_usd"] == expected.quantize(Decimal("1e-9"))
    assert row["price_version"] == "2025-06-01" and row["key_id"] == "key-1"


def test_chat_stream_without_include_usage_drops_the_usage_chunk(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat(stream=True))
    assert response.status_code == 200
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.mimetype == "text/event-stream"
    events = sse_data(response.data)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["choices"] for c in chunks), "the usage chunk must not reach a client that did not ask"
    [row] = rows()
    assert row["status"] == "ok" and row["output_tokens"] == 16 and row["input_tokens"] > 0


def test_chat_stream_with_include_usage_keeps_it(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True}))
    chunks = [orjson.loads(e) for e in sse_data(response.data)[:-1]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    [row] = rows()
    assert (row["input_tokens"], row["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_stream_cut_by_the_upstream_is_charged_for_chunks_sent(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat("four words of prompt #fake:cut_after=3", stream=True))
    events = sse_data(response.data)
    assert b"error" in events[-1]
    [row] = rows()
    assert row["status"] == "error" and row["output_tokens"] == 3
    assert row["input_tokens"] == 5  # estimated from the prompt's words


def test_messages_non_stream_and_stream(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/messages", json=message())
    assert response.status_code == 200
    body = response.get_json()
    assert body["type"] == "message"
    streamed = client.post("/v1/messages", json=message(stream=True))
    assert b"event: message_stop" in streamed.data
    first, second = rows()
    assert first["operation"] == "messages" and first["output_tokens"] == body["usage"]["output_tokens"]
    assert second["status"] == "ok" and second["output_tokens"] == 16 and second["input_tokens"] > 0


def test_messages_mid_stream_error_is_forwarded(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/messages", json=message("hi #fake:stream_error_after=2", stream=True))
    assert b"event: error" in response.data
    [row] = rows()
    assert row["status"] == "error" and row["output_tokens"] == 2


def test_embeddings(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": ["a b", "c"]})
    assert response.status_code == 200
    assert len(response.get_json()["data"]) == 2
    [row] = rows()
    assert row["operation"] == "embeddings" and row["input_tokens"] > 0 and row["output_tokens"] == 0


def test_models_list_follows_the_tokens_models_claim(app, token_mint, make_client) -> None:  # type: ignore[no-untyped-def]
    Client = make_client
    everything = Client(app, token_mint.mint("u-models")).get("/v1/models").get_json()
    assert everything["object"] == "list"
    ids = {m["id"]: m["owned_by"] for m in everything["data"]}
    assert ids["gpt-4o-mini"] == "openai" and ids["claude-3-5-haiku-latest"] == "anthropic"
    limited = Client(app, token_mint.mint("u-models", models=["gpt-4o-mini"])).get("/v1/models").get_json()
    assert [m["id"] for m in limited["data"]] == ["gpt-4o-mini"]


def test_usage_is_aggregated_per_day_and_model(client: Any) -> None:
    client.post(CHAT, json=chat())
    client.post(CHAT, json=chat())
    client.post("/v1/messages", json=message())
    data = client.get("/v1/usage").get_json()["data"]
    by_model = {row["model"]: row for row in data}
    assert by_model["gpt-4o-mini"]["requests"] == 2
    assert by_model["claude-3-5-haiku-latest"]["requests"] == 1
    assert by_model["gpt-4o-mini"]["cost_usd"] > 0
    assert client.get("/v1/usage?start=2020-01-01&end=2020-01-02").get_json()["data"] == []
    assert client.get("/v1/usage?start=2020-01-03&end=2020-01-02").status_code == 400


@pytest.mark.parametrize(
    ("path", "payload", "status", "shape"),
    [
        (CHAT, {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "openai"),
        (CHAT, {"messages": [{"role": "user", "content": "x"}]}, 400, "openai"),
        (CHAT, {"model": "gpt-4o-mini"}, 400, "openai"),
        (CHAT, chat() | {"model": "text-embedding-3-small"}, 400, "openai"),
        (
            "/v1/messages",
            {"model": "claude-3-5-haiku-latest", "messages": [{"role": "user", "content": "x"}]},
            400,
            "anthropic",
        ),
        ("/v1/messages", message() | {"model": "nope"}, 404, "anthropic"),
        ("/v1/embeddings", {"model": "text-embedding-3-small"}, 400, "openai"),
        (CHAT, chat() | {"stream": "false"}, 400, "openai"),
        (CHAT, chat() | {"stream": 1}, 400, "openai"),
        ("/v1/messages", message() | {"stream": "true"}, 400, "anthropic"),
    ],
)
def test_bad_requests_get_a_4xx_in_the_routes_shape(client: Any, path, payload, status, shape) -> None:  # type: ignore[no-untyped-def]
    response = client.post(path, json=payload)
    assert response.status_code == status
    body = response.get_json()
    if shape == "openai":
        assert body["error"]["message"] and body["error"]["type"]
        if status == 404:
            assert body["error"]["code"] == "model_not_found"
    else:
        assert body["type"] == "error" and body["error"]["type"]


def test_body_that_is_not_json_is_a_400(client: Any) -> None:
    response = client.post(CHAT, data=b"{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.get_json()["error"]["type"] == "invalid_request_error"


def test_tokens_are_required_and_checked(app, token_mint, make_client) -> None:  # type: ignore[no-untyped-def]
    Client = make_client
    assert Client(app, None).post(CHAT, json=chat()).status_code == 401
    assert Client(app, "not-a-jwt").post(CHAT, json=chat()).status_code == 401
    anthropic_shape = Client(app, None).post("/v1/messages", json=message()).get_json()
    assert anthropic_shape["error"]["type"] == "authentication_error"
    limited = Client(app, token_mint.mint("u-limited", models=["claude-3-5-haiku-latest"]))
    response = limited.post(CHAT, json=chat())
    assert response.status_code == 403 and response.get_json()["error"]["type"] == "permission_error"


def test_provider_429_keeps_status_and_retry_after(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat("x #fake:error=429 #fake:retry_after=7"))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.get_json()["error"]["type"] == "rate_limit_error"
    [row] = rows()
    assert row["status"] == "error" and row["cost_usd"] == 0


@pytest.mark.parametrize("status", [500, 503, 529])
def test_provider_5xx_is_a_502(client: Any, status: int) -> None:
    response = client.post("/v1/messages", json=message(f"x #fake:error={status}"))
    assert response.status_code == 502
    assert response.get_json()["error"]["type"] == "api_error"


def test_provider_garbage_is_a_502(client: Any) -> None:
    response = client.post(CHAT, json=chat("x #fake:garbage"))
    assert response.status_code == 502


def test_provider_key_and_url_never_reach_the_client(  # type: ignore[no-untyped-def]
    fake_provider, make_app, make_client, token_mint, provider_key
) -> None:
    wrong = make_app(openai_api_key="wrong-" + provider_key)
    response = make_client(wrong, token_mint.mint("u-wrong")).post(CHAT, json=chat())
    assert response.status_code == 502
    assert provider_key.encode() not in response.data
    assert fake_provider.encode() not in response.data


def test_unreachable_provider_is_a_502(make_app, make_client, token_mint) -> None:  # type: ignore[no-untyped-def]
    dead = make_app(anthropic_base_url=f"http://127.0.0.1:{free_port()}")
    response = make_client(dead, token_mint.mint("u-dead")).post("/v1/messages", json=message())
    assert response.status_code == 502
    assert response.get_json()["type"] == "error"


def test_health_and_openapi(app) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["database"] == "ok"
    spec = client.get("/openapi/openapi.json").get_json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/messages" in spec["paths"]
