"""Service tests of cross-format calls: the Flask test client, PostgreSQL and the real fake provider."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLAUDE_TOOL = {
    "name": "get_weather",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def chat(text: str = "hello there friend", **extra: object) -> dict:
    """An OpenAI-format request for an Anthropic-routed model."""
    return {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": text}], **extra}


def message(text: str = "hello there friend", **extra: object) -> dict:
    """An Anthropic-format request for an OpenAI-routed model."""
    return {"model": "gpt-4o-mini", "max_tokens": 64, "messages": [{"role": "user", "content": text}], **extra}


def chunks(body: bytes) -> list[Any]:
    """OpenAI stream payloads ("[DONE]" as a string); fails on anything that is not a data-only event."""
    out: list[Any] = []
    for event in body.split(b"\n\n"):
        if event:
            assert event.startswith(b"data: "), event
            out.append("[DONE]" if event == b"data: [DONE]" else orjson.loads(event[6:]))
    return out


def named(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Anthropic stream events as (name, data)."""
    out = []
    for event in body.split(b"\n\n"):
        if event:
            name, data = event.split(b"\n")
            out.append((name.removeprefix(b"event: ").decode(), orjson.loads(data.removeprefix(b"data: "))))
    return out


def test_openai_format_to_claude_non_stream(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat(system_fingerprint=None, max_tokens=50))
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["content"].startswith("Parley fake reply to: hello there friend")
    assert choice["finish_reason"] == "stop"
    [row] = rows()
    assert row["provider"] == "anthropic" and row["operation"] == "chat" and row["status"] == "ok"
    assert (row["input_tokens"], row["output_tokens"]) == (
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    assert row["output_tokens"] == 16 and row["input_tokens"] == 3


def test_openai_format_to_claude_length_and_stop_sequences(client: Any) -> None:
    capped = client.post(CHAT, json=chat(max_completion_tokens=4)).get_json()
    assert capped["choices"][0]["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 4
    stopped = client.post(CHAT, json=chat(stop=["fake"])).get_json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["message"]["content"] == "Parley"


def test_openai_format_to_claude_stream_with_usage(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(CHAT, json=chat(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = chunks(response.data)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
    assert text.startswith("Parley fake reply to: hello")
    assert [c["choices"][0]["finish_reason"] for c in events[:-1] if c["choices"]][-1] == "stop"
    usage = events[-2]["usage"]
    [row] = rows()
    assert row["status"] == "ok" and (row["input_tokens"], row["output_tokens"]) == (3, 16)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 16)


def test_openai_format_to_claude_forced_tool_call(client: Any) -> None:
    request = chat(
        "weather please", tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    body = client.post(CHAT, json=request).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "fake-city"}
    # The tool result goes back as an OpenAI tool message and comes out as an Anthropic tool_result.
    follow = {
        **request,
        "tool_choice": "none",
        "messages": [
            *request["messages"],
            choice["message"],
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny and 21 degrees"},
        ],
    }
    answer = client.post(CHAT, json=follow)
    assert answer.status_code == 200, answer.data
    assert answer.get_json()["choices"][0]["finish_reason"] == "stop"

    streamed = chunks(client.post(CHAT, json={**request, "stream": True}).data)
    calls = [
        c["choices"][0]["delta"]["tool_calls"][0] for c in streamed[:-1] if c["choices"][0]["delta"].get("tool_calls")
    ]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert orjson.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "fake-city"}
    assert streamed[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_anthropic_format_to_gpt_non_stream(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(MESSAGES, json=message(system="Be brief."))
    assert response.status_code == 200, response.data
    body = response.get_json()
    assert body["type"] == "message" and body["id"].startswith("msg_") and body["role"] == "assistant"
    assert body["content"][0]["text"].startswith("Parley fake reply to: hello there friend")
    assert body["stop_reason"] == "end_turn"
    [row] = rows()
    assert row["provider"] == "openai" and row["operation"] == "messages" and row["status"] == "ok"
    assert (row["input_tokens"], row["output_tokens"]) == (5, 16)  # "Be brief." counts as two words
    assert (body["usage"]["input_tokens"], body["usage"]["output_tokens"]) == (5, 16)


def test_anthropic_format_to_gpt_stream(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    response = client.post(MESSAGES, json=message(stream=True, max_tokens=5))
    assert response.status_code == 200
    events = named(response.data)
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names[1] == "content_block_start" and names[-3] == "content_block_stop"
    assert set(names[2:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    assert events[0][1]["message"]["usage"]["input_tokens"] == 3
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"] == {
        "input_tokens": 3,
        "output_tokens": 5,
        "cache_read_input_tokens": 0,
    }
    [row] = rows()
    assert row["status"] == "ok" and (row["input_tokens"], row["output_tokens"]) == (3, 5)


def test_anthropic_format_to_gpt_forced_tool_use(client: Any) -> None:
    request = message("weather please", tools=[CLAUDE_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    body = client.post(MESSAGES, json=request).get_json()
    assert body["stop_reason"] == "tool_use"
    [block] = body["content"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather" and block["input"] == {"city": "fake-city"}
    follow = {
        **request,
        "tool_choice": {"type": "auto"},
        "messages": [
            *request["messages"],
            {"role": "assistant", "content": body["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "sunny"}]},
        ],
    }
    answer = client.post(MESSAGES, json=follow)
    assert answer.status_code == 200, answer.data
    assert answer.get_json()["stop_reason"] == "end_turn"

    events = named(client.post(MESSAGES, json={**request, "stream": True}).data)
    start = next(d for n, d in events if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "get_weather"
    fragments = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert orjson.loads("".join(fragments)) == {"city": "fake-city"}
    assert next(d for n, d in events if n == "message_delta")["delta"]["stop_reason"] == "tool_use"


def test_upstream_errors_come_back_in_the_clients_shape(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    openai_side = client.post(CHAT, json=chat("x #fake:error=400"))
    assert openai_side.status_code == 400
    assert openai_side.get_json()["error"]["type"] == "invalid_request_error"
    anthropic_side = client.post(MESSAGES, json=message("x #fake:error=404"))
    assert anthropic_side.status_code == 404
    assert anthropic_side.get_json()["type"] == "error"
    assert anthropic_side.get_json()["error"]["type"] == "not_found_error"
    assert [r["status"] for r in rows()] == ["error", "error"]


def test_mid_stream_errors_in_the_clients_format(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    openai_side = chunks(client.post(CHAT, json=chat("x #fake:stream_error_after=2", stream=True)).data)
    assert openai_side[-1]["error"]["code"] == "overloaded_error" and "[DONE]" not in openai_side
    assert all(c["choices"][0]["finish_reason"] is None for c in openai_side[:-1]), "no fake finish_reason"
    anthropic_side = named(client.post(MESSAGES, json=message("x #fake:stream_error_after=2", stream=True)).data)
    assert anthropic_side[-1][0] == "error" and anthropic_side[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [n for n, _ in anthropic_side]
    assert [(r["status"], r["output_tokens"]) for r in rows()] == [("error", 2), ("error", 2)]


def test_cut_streams_are_charged_for_what_was_sent(client: Any, rows) -> None:  # type: ignore[no-untyped-def]
    openai_side = chunks(client.post(CHAT, json=chat("x #fake:cut_after=3", stream=True)).data)
    assert "error" in openai_side[-1] and "[DONE]" not in openai_side
    anthropic_side = named(client.post(MESSAGES, json=message("x #fake:cut_after=3", stream=True)).data)
    assert anthropic_side[-1][0] == "error"
    assert [(r["status"], r["output_tokens"]) for r in rows()] == [("error", 3), ("error", 3)]
    assert all(r["input_tokens"] > 0 for r in rows())


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (CHAT, chat(n=3), {"error"}),
        (CHAT, chat(response_format={"type": "json_object"}), {"error"}),
        (CHAT, chat(messages=[{"role": "tool", "content": "no id"}]), {"error"}),
        (MESSAGES, message(messages=[{"role": "user", "content": [{"type": "document"}]}]), {"type", "error"}),
        (MESSAGES, message(tools=[{"type": "bash_20250124", "name": "bash"}]), {"type", "error"}),
    ],
)
def test_untranslatable_requests_are_400_in_the_clients_shape(
    client: Any,
    rows,  # type: ignore[no-untyped-def]
    path: str,
    body: dict,
    expected: set[str],
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400
    assert set(response.get_json()) == expected
    assert rows() == [], "nothing was sent upstream, so nothing is charged"
