"""A provider that answers with unusable usage or an unexpected shape: the client gets its answer or the API's own
error (never a bare 500 or a cut), the call gets its ledger row, and its budget reservation is released.

The upstream is a loopback server of the test's own answering one canned body per test: the fake provider always
tells the truth about usage. Prices are the dime models' (conftest): one output token costs $0.10, input is free.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from parley_kit.testing import LoopbackServer, eventually, read_http_request, send_json
from parley_llm import relay

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
def garbage_app(make_app, dime_file: str, upstream: Upstream):  # type: ignore[no-untyped-def]
    return make_app(
        models_file=dime_file, openai_base_url=f"{upstream.server.url}/v1", anthropic_base_url=upstream.server.url
    )


@pytest.fixture
def admin(garbage_app, make_client, token_mint) -> Any:  # type: ignore[no-untyped-def]
    return make_client(garbage_app, token_mint.mint("the-admin", roles=["admin"]))


@pytest.fixture
def member(garbage_app, admin, make_client, token_mint, user: str) -> Any:  # type: ignore[no-untyped-def]
    """A member with a $10 budget of their own (their calls settle it with their row, one by one)."""
    put = admin._client.put(
        f"/v1/budgets/users/{user}", json={"limit_usd": "10", "period": "month"}, headers=admin.headers
    )
    assert put.status_code == 200
    return make_client(garbage_app, token_mint.mint(user))


def settled(rows: Any, admin: Any, user: str) -> tuple[dict[str, Any], float]:
    """The user's one ledger row and the budget spent (USD), once nothing is reserved (settlement may be detached)."""
    budget = lambda: admin.get(f"/v1/budgets/users/{user}").get_json()  # noqa: E731
    assert eventually(lambda: len(rows()) == 1 and budget()["reserved_usd"] == 0, seconds=10)
    (row,) = rows()
    return row, budget()["spent_usd"]


def chat(model: str = "dime-gpt", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": PROMPT}], **extra}


DIME = 0.1  # USD per output token


@pytest.mark.parametrize("usage", UNUSABLE_OPENAI_USAGE, ids=repr)
def test_unusable_openai_usage_is_passed_on_and_charged_an_estimate(
    upstream: Upstream, member: Any, admin: Any, rows: Any, user: str, usage: Any
) -> None:
    upstream.body, upstream.stream = chat_answer(usage), False
    response = member.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    assert response.data == upstream.body  # the provider's bytes, unchanged
    row, spent = settled(rows, admin, user)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 4, ANSWER_WORDS)
    assert spent == pytest.approx(ANSWER_WORDS * DIME) and row["cost_usd"] == Decimal("0.3")


@pytest.mark.parametrize("usage", UNUSABLE_ANTHROPIC_USAGE, ids=repr)
def test_unusable_anthropic_usage_is_passed_on_and_charged_an_estimate(
    upstream: Upstream, member: Any, admin: Any, rows: Any, user: str, usage: Any
) -> None:
    upstream.body, upstream.stream = message_answer(usage), False
    response = member.post("/v1/messages", json=chat("dime-claude"))
    assert response.status_code == 200 and response.data == upstream.body
    row, spent = settled(rows, admin, user)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 4, ANSWER_WORDS)
    assert spent == pytest.approx(ANSWER_WORDS * DIME)


def test_tool_calls_count_in_the_estimate(upstream: Upstream, member: Any, admin: Any, rows: Any, user: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}}
    upstream.body = chat_answer({}, choices=[{"message": {"content": None, "tool_calls": [call]}}])
    upstream.stream = False
    assert member.post("/v1/chat/completions", json=chat()).status_code == 200
    row, _ = settled(rows, admin, user)
    assert (row["input_tokens"], row["output_tokens"]) == (4, 2)


def test_usable_usage_is_charged_as_told(upstream: Upstream, member: Any, admin: Any, rows: Any, user: str) -> None:
    """The control: the same answer with real counts is charged those counts, not an estimate."""
    upstream.body, upstream.stream = chat_answer({"prompt_tokens": 11, "completion_tokens": 2}), False
    assert member.post("/v1/chat/completions", json=chat()).status_code == 200
    row, spent = settled(rows, admin, user)
    assert (row["input_tokens"], row["output_tokens"], spent) == (11, 2, pytest.approx(2 * DIME))


def test_a_call_without_a_budget_gets_its_estimated_row_too(
    upstream: Upstream, garbage_app: Any, make_client: Any, token_mint: Any, rows: Any, user: str
) -> None:
    """No budget: the row goes through the batched INSERT (one bad count must not fail a batch of others)."""
    upstream.body, upstream.stream = chat_answer({"prompt_tokens": 1, "completion_tokens": 2**40}), False
    client = make_client(garbage_app, token_mint.mint(user))
    assert client.post("/v1/chat/completions", json=chat()).status_code == 200
    assert eventually(lambda: len(rows()) == 1, seconds=10)
    assert (rows()[0]["input_tokens"], rows()[0]["output_tokens"]) == (4, ANSWER_WORDS)


def test_translated_answer_with_unusable_usage_says_zero_and_is_charged_an_estimate(
    upstream: Upstream, member: Any, admin: Any, rows: Any, user: str
) -> None:
    upstream.body, upstream.stream = message_answer({"input_tokens": "x", "output_tokens": 3}), False
    response = member.post("/v1/chat/completions", json=chat("dime-claude"))
    assert response.status_code == 200
    answer = response.get_json()
    assert answer["choices"][0]["message"]["content"] == "one two three"
    assert answer["usage"]["prompt_tokens"] == 0 and answer["usage"]["completion_tokens"] == 0
    row, spent = settled(rows, admin, user)
    assert (row["input_tokens"], row["output_tokens"], spent) == (4, ANSWER_WORDS, pytest.approx(ANSWER_WORDS * DIME))


@pytest.mark.parametrize(
    ("model", "body"),
    [
        ("dime-claude", message_answer({"input_tokens": 1, "output_tokens": 1}, stop_reason=["end_turn"])),
        (
            "dime-gpt",
            chat_answer({"prompt_tokens": 1, "completion_tokens": 1}, choices=[{"message": {"tool_calls": ["x"]}}]),
        ),
    ],
    ids=["anthropic-to-openai", "openai-to-anthropic"],
)
def test_untranslatable_answer_is_a_502_in_the_clients_shape_and_not_charged(
    upstream: Upstream, member: Any, admin: Any, rows: Any, user: str, model: str, body: bytes
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
    row, spent = settled(rows, admin, user)
    assert row["status"] == "error" and row["output_tokens"] == 0 and spent == 0


def test_an_unexpected_error_still_settles_the_call(
    upstream: Upstream, member: Any, admin: Any, rows: Any, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of ours while reading an answer (simulated): a 500 in the API's shape, and the reservation released."""

    def broken(*_args: Any) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(relay, "read_usage", broken)
    upstream.body, upstream.stream = chat_answer({"prompt_tokens": 1, "completion_tokens": 1}), False
    response = member.post("/v1/chat/completions", json=chat())
    assert response.status_code == 500 and response.get_json()["error"]["type"]
    row, spent = settled(rows, admin, user)
    assert row["status"] == "error" and spent == 0


def stream_chunk(**chunk: Any) -> bytes:
    base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    return b"data: " + orjson.dumps({**base, **chunk})


def named(event: str, **data: Any) -> bytes:
    return b"event: %s\ndata: %s" % (event.encode(), orjson.dumps({"type": event, **data}))


def openai_stream_with_unusable_usage() -> bytes:
    return sse(
        stream_chunk(choices=[{"index": 0, "delta": {"content": "one "}}]),
        stream_chunk(choices=["not a choice", {"index": 0, "delta": ["nor a delta"]}]),
        stream_chunk(choices=[{"index": 0, "delta": {"content": "two"}}]),
        stream_chunk(choices=[], usage={"prompt_tokens": "many", "completion_tokens": -1}),
        b"data: [DONE]",
    )


def anthropic_stream_with_unusable_usage() -> bytes:
    message = {"id": "msg_s", "type": "message", "role": "assistant", "model": "claude-haiku-4-5", "content": []}
    delta = {"type": "text_delta", "text": "word "}
    return sse(
        named("message_start", message={**message, "usage": {"input_tokens": "x"}}),
        named("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        named("content_block_delta", index=0, delta=delta),
        named("content_block_delta", index=0, delta=delta),
        named("content_block_stop", index=0),
        named("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": -1}),
        named("message_stop"),
    )


@pytest.mark.parametrize(
    ("route", "model", "events", "error_marker"),
    [
        ("/v1/chat/completions", "dime-gpt", openai_stream_with_unusable_usage(), b'"error"'),
        ("/v1/messages", "dime-claude", anthropic_stream_with_unusable_usage(), b"event: error"),
    ],
    ids=["openai", "anthropic"],
)
def test_stream_with_unusable_usage_is_charged_by_its_chunks(
    upstream: Upstream,
    member: Any,
    admin: Any,
    rows: Any,
    user: str,
    route: str,
    model: str,
    events: bytes,
    error_marker: bytes,
) -> None:
    upstream.body, upstream.stream = events, True
    response = member.post(route, json=chat(model, stream=True))
    assert response.status_code == 200 and error_marker not in response.data
    row, spent = settled(rows, admin, user)
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == ("ok", 4, 2)
    assert spent == pytest.approx(2 * DIME)


def test_stream_event_that_cannot_be_translated_ends_with_an_error_event(
    upstream: Upstream, member: Any, admin: Any, rows: Any, user: str
) -> None:
    """An OpenAI stream translated for an Anthropic client, whose tool call is not an object: the client gets the
    events so far and Anthropic's error event (not a cut connection); the call is an error, charged the one delta
    that was sent."""
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
    row, spent = settled(rows, admin, user)
    assert (row["status"], row["output_tokens"]) == ("error", 1) and spent == pytest.approx(DIME)
