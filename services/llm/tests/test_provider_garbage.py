"""A provider that answers with unusable usage or an unexpected shape: the client gets its answer or the API's own
error (never a 500 or a cut), the call gets its ledger row, and its budget reservation is released.

The upstream is a loopback server of the test's own answering one canned body per test: the fake provider always
tells the truth about usage. Prices as in test_budgets: one output token costs $0.10, input is free.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
from sqlalchemy import create_engine, text

from parley_kit.db import upgrade
from parley_kit.testing import LoopbackServer, eventually, read_http_request, send_json
from parley_llm import MIGRATIONS_DIR

PRICES = """
prices:
  price_version: test-dime
  dime-gpt: {input: 0, output: 100000}
  dime-claude: {input: 0, output: 100000}
models:
  dime-gpt: {provider: openai, upstream_model: gpt-4o-mini}
  dime-claude: {provider: anthropic, upstream_model: claude-haiku-4-5}
"""

ANSWER_WORDS = 3  # "one two three": what an answer without usable usage is charged as output
PROMPT = "four words of prompt"

UNUSABLE_OPENAI_USAGE = [
    [],
    "lots",
    {"prompt_tokens": "7", "completion_tokens": 3},
    {"prompt_tokens": -5, "completion_tokens": 3},
    {"prompt_tokens": 1, "completion_tokens": 2**40},
    {"prompt_tokens": True, "completion_tokens": 3},
    {"prompt_tokens": 1.5, "completion_tokens": 3},
    None,
]
UNUSABLE_ANTHROPIC_USAGE = [
    [1, 2],
    {"input_tokens": 4, "output_tokens": "30"},
    {"input_tokens": 4, "output_tokens": -1},
    {"input_tokens": 4, "cache_read_input_tokens": 2**31, "output_tokens": 3},
    None,
]


def chat_answer(usage: Any, **extra: Any) -> bytes:
    body = {
        "id": "chatcmpl-garbage",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "one two three"}, "finish_reason": "stop"}
        ],
        **extra,
    }
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def message_answer(usage: Any, **extra: Any) -> bytes:
    body = {
        "id": "msg_garbage",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [{"type": "text", "text": "one two three"}],
        "stop_reason": "end_turn",
        **extra,
    }
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def sse(*events: bytes) -> bytes:
    return b"".join(event + b"\n\n" for event in events)


class Upstream:
    """The loopback provider: every request is answered with `body` (JSON, or an event stream when `stream`)."""

    def __init__(self) -> None:
        self.body = b"{}"
        self.stream = False
        self.server = LoopbackServer(self._handle, name="garbage-provider")

    def _handle(self, connection: socket.socket) -> None:
        while read_http_request(connection):
            if self.stream:
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(self.body), self.body)
                )
            else:
                send_json(connection, self.body)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    provider = Upstream()
    yield provider
    provider.server.close()


@pytest.fixture(scope="module")
def database(postgres, tmp_path_factory: pytest.TempPathFactory) -> str:  # type: ignore[no-untyped-def]
    url: str = postgres.create_database("llm_garbage")
    upgrade(MIGRATIONS_DIR, url)
    return url


@pytest.fixture(scope="module")
def garbage_app(make_app, database: str, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    prices = tmp_path_factory.mktemp("prices") / "models.yaml"
    prices.write_text(PRICES)
    return make_app(
        database_url=database,
        models_file=str(prices),
        openai_base_url=f"{upstream.server.url}/v1",
        anthropic_base_url=upstream.server.url,
    )


@pytest.fixture
def member(garbage_app, make_client, token_mint, user: str) -> Any:  # type: ignore[no-untyped-def]
    """A member with a $10 budget of their own."""
    admin = make_client(garbage_app, token_mint.mint("the-admin", roles=["admin"]))
    put = admin._client.put(
        f"/v1/budgets/users/{user}", json={"limit_usd": "10", "period": "month"}, headers=admin.headers
    )
    assert put.status_code == 200
    return make_client(garbage_app, token_mint.mint(user))


def ledger(database: str, user: str) -> tuple[list[dict[str, Any]], int, int]:
    """(the user's usage rows, spent and reserved nano-USD of their budget)."""
    engine = create_engine(database)
    with engine.connect() as connection:
        rows = [
            dict(row)
            for row in connection.execute(
                text("SELECT * FROM usage_records WHERE user_id = :u ORDER BY id"), {"u": user}
            ).mappings()
        ]
        spent, reserved = connection.execute(
            text("SELECT spent_nusd, reserved_nusd FROM budgets WHERE subject_id = :u"), {"u": user}
        ).one()
    engine.dispose()
    return rows, spent, reserved


def settled(database: str, user: str, calls: int = 1) -> tuple[list[dict[str, Any]], int, int]:
    """The ledger once `calls` rows are written and nothing is reserved any more (settlement may be detached)."""
    assert eventually(lambda: (lambda r: len(r[0]) == calls and r[2] == 0)(ledger(database, user)), seconds=10)
    return ledger(database, user)


def chat(model: str = "dime-gpt", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": PROMPT}], **extra}


@pytest.mark.parametrize("usage", UNUSABLE_OPENAI_USAGE, ids=repr)
def test_unusable_openai_usage_is_passed_on_and_charged_an_estimate(
    upstream: Upstream, member: Any, database: str, user: str, usage: Any
) -> None:
    upstream.body, upstream.stream = chat_answer(usage), False
    response = member.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.data == upstream.body  # the provider's bytes, unchanged
    (row,), spent, _ = settled(database, user)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 4, ANSWER_WORDS)
    assert spent == ANSWER_WORDS * 100_000_000 and row["cost_usd"] == Decimal("0.3")


@pytest.mark.parametrize("usage", UNUSABLE_ANTHROPIC_USAGE, ids=repr)
def test_unusable_anthropic_usage_is_passed_on_and_charged_an_estimate(
    upstream: Upstream, member: Any, database: str, user: str, usage: Any
) -> None:
    upstream.body, upstream.stream = message_answer(usage), False
    response = member.post("/v1/messages", json=chat("dime-claude"))
    assert response.status_code == 200 and response.data == upstream.body
    (row,), spent, _ = settled(database, user)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 4, ANSWER_WORDS)
    assert spent == ANSWER_WORDS * 100_000_000


def test_usable_usage_is_charged_as_told(upstream: Upstream, member: Any, database: str, user: str) -> None:
    """The control: the same answer with real counts is charged those counts, not an estimate."""
    upstream.body, upstream.stream = chat_answer({"prompt_tokens": 11, "completion_tokens": 2}), False
    assert member.post("/v1/chat/completions", json=chat()).status_code == 200
    (row,), spent, _ = settled(database, user)
    assert (row["input_tokens"], row["output_tokens"], spent) == (11, 2, 200_000_000)


def test_translated_answer_with_unusable_usage_says_zero_and_is_charged_an_estimate(
    upstream: Upstream, member: Any, database: str, user: str
) -> None:
    upstream.body, upstream.stream = message_answer({"input_tokens": "x", "output_tokens": 3}), False
    response = member.post("/v1/chat/completions", json=chat("dime-claude"))
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["choices"][0]["message"]["content"] == "one two three"
    assert answer["usage"]["prompt_tokens"] == 0 and answer["usage"]["completion_tokens"] == 0
    (row,), spent, _ = settled(database, user)
    assert (row["input_tokens"], row["output_tokens"], spent) == (4, ANSWER_WORDS, 300_000_000)


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("dime-claude", message_answer({"input_tokens": 1, "output_tokens": 1}, stop_reason=["end_turn"])),
        ("dime-gpt", chat_answer(None, choices=[{"message": {"content": None, "tool_calls": ["x"]}}])),
    ],
    ids=["anthropic-to-openai", "openai-to-anthropic"],
)
def test_untranslatable_answer_is_a_502_in_the_clients_shape(
    upstream: Upstream, member: Any, database: str, user: str, model: str, body: bytes
) -> None:
    upstream.body, upstream.stream = body, False
    route = "/v1/chat/completions" if model == "dime-claude" else "/v1/messages"
    response = member.post(route, json=chat(model))
    assert response.status_code == 502
    error = response.get_json()
    if route == "/v1/messages":
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
    else:
        assert set(error) == {"error"} and "unexpected body" in error["error"]["message"]
    rows, _, reserved = settled(database, user)
    assert reserved == 0 and len(rows) == 1


def stream_chunk(**chunk: Any) -> bytes:
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    return b"data: " + orjson.dumps({**base, **chunk})


def test_stream_with_unusable_usage_is_charged_by_its_chunks(
    upstream: Upstream, member: Any, database: str, user: str
) -> None:
    upstream.stream = True
    upstream.body = sse(
        stream_chunk(choices=[{"index": 0, "delta": {"content": "one "}}]),
        stream_chunk(choices=["not a choice", {"index": 0, "delta": ["nor a delta"]}]),
        stream_chunk(choices=[{"index": 0, "delta": {"content": "two"}}]),
        stream_chunk(choices=[], usage={"prompt_tokens": "many", "completion_tokens": -1}),
        b"data: [DONE]",
    )
    response = member.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200
    assert b'"error"' not in response.data and response.data.endswith(b"data: [DONE]\n\n")
    (row,), spent, _ = settled(database, user)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 4, 2)
    assert spent == 2 * 100_000_000


def test_stream_event_that_cannot_be_translated_ends_with_an_error_event(
    upstream: Upstream, member: Any, database: str, user: str
) -> None:
    """An OpenAI stream translated for an Anthropic client, whose tool call is not an object: the client gets the
    events so far and Anthropic's error event (not a cut connection); the call is recorded as an error."""
    upstream.stream = True
    upstream.body = sse(
        stream_chunk(choices=[{"index": 0, "delta": {"content": "one"}}]),
        stream_chunk(choices=[{"index": 0, "delta": {"tool_calls": ["not a call"]}}]),
        stream_chunk(choices=[{"index": 0, "delta": {"content": "never sent"}}]),
        b"data: [DONE]",
    )
    response = member.post("/v1/messages", json=chat("dime-gpt", stream=True))
    assert response.status_code == 200
    events = response.data.decode()
    assert "event: content_block_delta" in events and "never sent" not in events
    assert events.rstrip().split("\n\n")[-1].startswith("event: error\ndata: ")
    (row,), _, _ = settled(database, user)
    assert row["status"] == "error"
