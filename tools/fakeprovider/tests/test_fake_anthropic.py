"""The Anthropic side of the fake provider, driven by the official anthropic SDK and raw HTTP."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anthropic
import pytest

from parley_fakeprovider import count_tokens

if TYPE_CHECKING:
    from conftest import FakeServer

USER: list[Any] = [{"role": "user", "content": "Tell me about the weather in Paris"}]
TOOLS: list[Any] = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
    {"name": "noop", "input_schema": {"type": "object", "properties": {}}},
]


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split a named-event SSE body into (event, data) pairs, checking the framing."""
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    events = []
    for frame in frames[:-1]:
        event_line, data_line = frame.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        events.append((event_line[7:].decode(), json.loads(data_line[6:])))
    return events


def test_message_non_stream(claude: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "You are terse."}]
    message = claude.messages.create(model="claude-sonnet-4-6", max_tokens=100, system=system, messages=USER)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    block = message.content[0]
    assert block.type == "text" and block.text.startswith("Parley fake reply to: Tell me about")
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == count_tokens(block.text) == 16
    assert message.usage.input_tokens == count_tokens("You are terse. Tell me about the weather in Paris")
    again = claude.messages.create(model="claude-sonnet-4-6", max_tokens=100, system="You are terse.", messages=USER)
    assert again.content == message.content and again.usage.input_tokens == message.usage.input_tokens


def test_max_tokens_and_stop_sequences(claude: anthropic.Anthropic) -> None:
    capped = claude.messages.create(model="m", max_tokens=4, messages=USER)
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 4
    stopped = claude.messages.create(model="m", max_tokens=50, messages=USER, stop_sequences=["reply"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "reply"
    assert stopped.content[0].type == "text" and stopped.content[0].text == "Parley fake"


def test_stream_helper(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Stream it #fake:tokens=25"}]
    with claude.messages.stream(model="m", max_tokens=100, messages=messages) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = "".join(pieces)
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens == len(pieces) == count_tokens(text) == 25
    assert final.usage.input_tokens == count_tokens(messages[0]["content"])
    assert final.stop_reason == "end_turn"


def test_stream_raw_events(fake: FakeServer) -> None:
    body = {"model": "m", "max_tokens": 3, "stream": True, "messages": USER}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    with fake.http.post(f"{fake.url}/v1/messages", json=body, headers=headers, stream=True, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.raw.read())
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start_usage = events[0][1]["message"]["usage"]
    assert start_usage["input_tokens"] == count_tokens(USER[0]["content"]) and start_usage["output_tokens"] == 1
    assert [d["delta"] for _, d in events[3:6]] == [
        {"type": "text_delta", "text": "Parley"},
        {"type": "text_delta", "text": " fake"},
        {"type": "text_delta", "text": " reply"},
    ]
    assert events[-2][1]["usage"] == {"output_tokens": 3}
    assert events[-2][1]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
def test_forced_tool_use(claude: anthropic.Anthropic, choice: Any) -> None:
    message = claude.messages.create(model="m", max_tokens=100, messages=USER, tools=TOOLS, tool_choice=choice)
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    assert block.input == {"city": "fake-city", "unit": "c"}
    assert message.usage.output_tokens == count_tokens(json.dumps(block.input))
    assert message.usage.input_tokens == count_tokens(USER[0]["content"]) + 20


def test_forced_tool_use_streamed(claude: anthropic.Anthropic) -> None:
    choice: Any = {"type": "tool", "name": "get_weather"}
    with claude.messages.stream(model="m", max_tokens=100, messages=USER, tools=TOOLS, tool_choice=choice) as stream:
        partials = [
            e.delta.partial_json
            for e in stream
            if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        ]
        final = stream.get_final_message()
    block = final.content[0]
    assert block.type == "tool_use" and block.input == json.loads("".join(partials))
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == len(partials)


def test_count_tokens_and_models(claude: anthropic.Anthropic) -> None:
    counted = claude.messages.count_tokens(model="m", messages=USER, system="two words")
    assert counted.input_tokens == count_tokens(USER[0]["content"]) + 2
    ids = [m.id for m in claude.models.list()]
    assert ids and all(i.startswith("claude") for i in ids)


def test_bad_requests_use_anthropic_error_shape(fake: FakeServer, claude: anthropic.Anthropic) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    missing = fake.http.post(f"{fake.url}/v1/messages", json={"model": "m", "messages": USER}, headers=headers)
    assert missing.status_code == 400
    assert missing.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": missing.json()["error"]["message"]},
    }
    assert "max_tokens" in missing.json()["error"]["message"]
    garbled = fake.http.post(f"{fake.url}/v1/messages", data=b"[", headers=headers, timeout=5)
    assert garbled.status_code == 400 and garbled.json()["type"] == "error"
    unknown = fake.http.get(f"{fake.url}/v1/nope", headers=headers, timeout=5)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="m", max_tokens=10, messages=[])
