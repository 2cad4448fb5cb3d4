"""Unit tests of the OpenAI ⇄ Anthropic translators on fixed inputs (no network)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from parley_kit.errors import BadRequest, UpstreamError
from parley_llm import translate
from parley_llm.catalog import Provider
from parley_llm.telemetry import CallRecord

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLAUDE_WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def record(provider: str = "anthropic", model: str = "claude-haiku-4-5") -> CallRecord:
    return CallRecord(operation="chat", provider=provider, request_model=model, upstream_model=model, streamed=True)


def sse(name: str | None, data: Any) -> bytes:
    """One upstream SSE event without its blank line."""
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    return (b"event: " + name.encode() + b"\n" if name else b"") + b"data: " + payload


def parse_named(out: bytes | None) -> list[tuple[str, dict[str, Any]]]:
    """The (event name, data) pairs of translated Anthropic events."""
    events = []
    for block in (out or b"").split(b"\n\n"):
        if not block:
            continue
        name_line, data_line = block.split(b"\n")
        assert name_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        data = orjson.loads(data_line[6:])
        assert data["type"] == name_line[7:].decode(), "the event name and the data's type must agree"
        events.append((name_line[7:].decode(), data))
    return events


def parse_chunks(out: bytes | None) -> list[Any]:
    """The data payloads of translated OpenAI chunks ("[DONE]" kept as a string)."""
    chunks: list[Any] = []
    for block in (out or b"").split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: ") and b"event:" not in block, "OpenAI streams are data-only"
        payload = block[6:]
        chunks.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return chunks


# ----- requests -------------------------------------------------------------------------------------------------


def test_openai_request_to_anthropic_maps_every_field() -> None:
    body = {
        "model": "claude-haiku-4-5",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "24C"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            },
        ],
        "max_completion_tokens": 100,
        "temperature": 1.6,
        "top_p": 0.9,
        "stop": "END",
        "tools": [WEATHER_TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "user": "u-42",
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 7,
    }
    out = translate.openai_to_anthropic_request(body, model="claude-haiku-4-5-20251001")
    assert out["model"] == "claude-haiku-4-5-20251001"
    assert out["system"] == "Be brief.\n\nUse metric units."
    assert out["max_tokens"] == 100
    assert out["temperature"] == 1.0  # OpenAI's 0..2 capped to Anthropic's 0..1
    assert out["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["tools"] == [CLAUDE_WEATHER_TOOL]
    assert out["tool_choice"] == {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
    assert out["metadata"] == {"user_id": "u-42"}
    assert out["stream"] is True
    assert "seed" not in out and "stream_options" not in out
    user1, assistant, tool_results = out["messages"]
    assert user1 == {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]}
    assert assistant["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    # Both tool results and the next user turn form one user message, results first.
    assert tool_results["role"] == "user"
    assert tool_results["content"][:2] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "call_2", "content": "24C"},
    ]
    assert tool_results["content"][2:] == [
        {"type": "text", "text": "And this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


def test_openai_request_defaults_and_tool_choice_words() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER_TOOL]}
    out = translate.openai_to_anthropic_request(base, model="m")
    assert out["max_tokens"] == translate.DEFAULT_MAX_TOKENS and "tool_choice" not in out and "system" not in out
    for word, expected in (("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"})):
        assert (
            translate.openai_to_anthropic_request({**base, "tool_choice": word}, model="m")["tool_choice"] == expected
        )
    assert translate.openai_to_anthropic_request({**base, "max_tokens": 9}, model="m")["max_tokens"] == 9


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [1]}, "stop"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}, None),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "18C"}]}, "messages.0.tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1"}}],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
    ],
)
def test_openai_request_that_cannot_be_translated_is_a_400(extra: dict[str, Any], param: str | None) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(BadRequest) as caught:
        translate.openai_to_anthropic_request(body, model="m")
    assert caught.value.status == 400
    if param:
        assert caught.value.param == param


def test_anthropic_request_to_openai_maps_every_field() -> None:
    body = {
        "model": "gpt-4o-mini",
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                    {"type": "text", "text": "Thanks."},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ],
            },
        ],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 5,
        "stop_sequences": ["END", "STOP"],
        "tools": [CLAUDE_WEATHER_TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-42"},
        "stream": True,
    }
    out = translate.anthropic_to_openai_request(body, model="gpt-4o-mini-2024-07-18")
    assert out["model"] == "gpt-4o-mini-2024-07-18"
    assert out["max_completion_tokens"] == 64
    assert (out["temperature"], out["top_p"]) == (0.5, 0.8)
    assert "top_k" not in out
    assert out["stop"] == ["END", "STOP"]
    assert out["tools"] == [WEATHER_TOOL]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["user"] == "u-42"
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    system, user, assistant, tool, user2 = out["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    }
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}
    assert user2 == {
        "role": "user",
        "content": [
            {"type": "text", "text": "Thanks."},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ],
    }


def test_anthropic_tool_choice_words() -> None:
    base = {
        "model": "m",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [CLAUDE_WEATHER_TOOL],
    }
    cases = [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ]
    for choice, expected in cases:
        assert (
            translate.anthropic_to_openai_request({**base, "tool_choice": choice}, model="m")["tool_choice"] == expected
        )
    plain = translate.anthropic_to_openai_request({**base, "stream": False}, model="m")
    assert "stream" not in plain and "stream_options" not in plain and "tool_choice" not in plain


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tool_choice": {"type": "any"}},
        {"temperature": 1.5},
        {"stop_sequences": "END"},
        {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
        {"messages": [{"role": "system", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
    ],
)
def test_anthropic_request_that_cannot_be_translated_is_a_400(extra: dict[str, Any]) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(BadRequest):
        translate.anthropic_to_openai_request(body, model="m")


# ----- answers --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls")],
)
def test_anthropic_answer_as_openai(stop_reason: str, finish_reason: str) -> None:
    message = {
        "id": "msg_01abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-haiku-4-5",
        "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 7},
    }
    out = translate.anthropic_to_openai_response(message)
    assert out["id"] == "chatcmpl-01abc" and out["object"] == "chat.completion" and out["model"] == "claude-haiku-4-5"
    [choice] = out["choices"]
    assert choice["finish_reason"] == finish_reason
    assert choice["message"]["content"] == "Checking."
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    ]
    assert out["usage"]["prompt_tokens"] == 25 and out["usage"]["completion_tokens"] == 7
    assert out["usage"]["total_tokens"] == 32 and out["usage"]["prompt_tokens_details"] == {"cached_tokens": 5}


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"), ("content_filter", "refusal")],
)
def test_openai_answer_as_anthropic(finish_reason: str, stop_reason: str) -> None:
    completion = {
        "id": "chatcmpl-xyz",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
                    ],
                },
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 10}},
    }
    out = translate.openai_to_anthropic_response(completion)
    assert out["id"] == "msg_xyz" and out["type"] == "message" and out["role"] == "assistant"
    assert out["stop_reason"] == stop_reason and out["stop_sequence"] is None
    assert out["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
    ]
    assert out["usage"] == {
        "input_tokens": 20,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 10,
    }


def test_unexpected_upstream_bodies_are_a_502() -> None:
    bridge = translate.bridge(Provider.OPENAI, Provider.ANTHROPIC)
    assert bridge is not None
    for data in ("not an object", [], {"content": 3}, {"content": [], "stop_reason": ["end_turn"]}):
        with pytest.raises(UpstreamError):
            bridge.response(data)
    with pytest.raises(UpstreamError):
        translate.openai_to_anthropic_response({"choices": []})
    assert translate.bridge(Provider.OPENAI, Provider.OPENAI) is None


# ----- streams --------------------------------------------------------------------------------------------------

ANTHROPIC_TOOL_STREAM = [
    sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01s",
                "type": "message",
                "role": "assistant",
                "model": "claude-haiku-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 21, "output_tokens": 1},
            },
        },
    ),
    sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    sse("ping", {"type": "ping"}),
    sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let"}},
    ),
    sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " me"}},
    ),
    sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
    sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_7", "name": "get_weather", "input": {}},
        },
    ),
    sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"city":'}},
    ),
    sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ' "Paris"}'}},
    ),
    sse("content_block_stop", {"type": "content_block_stop", "index": 1}),
    sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 4},
        },
    ),
    sse("message_stop", {"type": "message_stop"}),
]


def test_anthropic_stream_as_openai_chunks_with_usage() -> None:
    rec = record()
    meter = translate.AnthropicToOpenAIStream(rec, include_usage=True)
    chunks = [c for event in ANTHROPIC_TOOL_STREAM for c in parse_chunks(meter.handle(event))]
    assert chunks[-1] == "[DONE]"
    body = chunks[:-1]
    assert {c["id"] for c in body} == {"chatcmpl-01s"}, "one id in every chunk"
    assert len({c["created"] for c in body}) == 1 and all(c["object"] == "chat.completion.chunk" for c in body)
    deltas = [c["choices"][0]["delta"] for c in body if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("content") for d in deltas[1:3]] == ["Let", " me"]
    assert deltas[3] == {
        "tool_calls": [
            {"index": 0, "id": "toolu_7", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
        ]
    }
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[4:6])
    assert orjson.loads(arguments) == {"city": "Paris"}
    finishes = [c["choices"][0]["finish_reason"] for c in body if c["choices"]]
    assert finishes == [None] * 6 + ["tool_calls"]
    usage_chunk = body[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 21
    assert usage_chunk["usage"]["completion_tokens"] == 4 and usage_chunk["usage"]["total_tokens"] == 25
    assert all(c["usage"] is None for c in body[:-1]), "every other chunk carries usage: null"
    # The ledger reads the upstream's own numbers through the wrapped meter.
    assert (rec.input_tokens, rec.output_tokens) == (21, 4)
    assert meter.done and meter.usage_seen and not meter.failed and meter.chunks == 4


def test_anthropic_stream_without_include_usage_has_no_usage_chunk() -> None:
    meter = translate.AnthropicToOpenAIStream(record(), include_usage=False)
    chunks = [c for event in ANTHROPIC_TOOL_STREAM for c in parse_chunks(meter.handle(event))]
    assert chunks[-1] == "[DONE]" and all(c["choices"] and "usage" not in c for c in chunks[:-1])


def test_anthropic_error_event_becomes_an_openai_error_chunk() -> None:
    rec = record()
    meter = translate.AnthropicToOpenAIStream(rec, include_usage=True, redact=lambda s: s.replace("sk-secret", "[x]"))
    meter.handle(ANTHROPIC_TOOL_STREAM[0])
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded sk-secret"}}
    [chunk] = parse_chunks(meter.handle(sse("error", error)))
    assert chunk == {"error": {"message": "Overloaded [x]", "type": "server_error", "code": "overloaded_error"}}
    assert meter.failed and not meter.done
    [cut] = parse_chunks(meter.error_event("the anthropic provider ended the stream early"))
    assert cut["error"]["message"] == "the anthropic provider ended the stream early"


def openai_chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    chunk = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini"}
    return sse(None, {**chunk, "choices": choices, "usage": usage})


OPENAI_TOOL_STREAM = [
    openai_chunk({"role": "assistant", "content": ""}),
    openai_chunk({"content": "Let"}),
    openai_chunk({"content": " me"}),
    openai_chunk(
        {"tool_calls": [{"index": 0, "id": "call_7", "type": "function", "function": {"name": "f", "arguments": ""}}]}
    ),
    openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
    openai_chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
    openai_chunk(
        {"tool_calls": [{"index": 1, "id": "call_8", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    ),
    openai_chunk({}, "tool_calls"),
    openai_chunk(None, usage={"prompt_tokens": 33, "completion_tokens": 6, "total_tokens": 39}),
    sse(None, b"[DONE]"),
]


def test_openai_stream_as_anthropic_events_in_wire_order() -> None:
    rec = record("openai", "gpt-4o-mini")
    meter = translate.OpenAIToAnthropicStream(rec, input_estimate=30)
    events = [e for event in OPENAI_TOOL_STREAM for e in parse_named(meter.handle(event))]
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"] == "msg_s1" and start["model"] == "gpt-4o-mini" and start["content"] == []
    assert start["usage"] == {"input_tokens": 30, "output_tokens": 0}
    blocks = [data for name, data in events if name == "content_block_start"]
    assert [b["index"] for b in blocks] == [0, 1, 2]
    assert blocks[0]["content_block"] == {"type": "text", "text": ""}
    assert blocks[1]["content_block"] == {"type": "tool_use", "id": "call_7", "name": "f", "input": {}}
    assert blocks[2]["content_block"]["id"] == "call_8"
    deltas = [data for name, data in events if name == "content_block_delta"]
    assert [d["delta"] for d in deltas[:2]] == [
        {"type": "text_delta", "text": "Let"},
        {"type": "text_delta", "text": " me"},
    ]
    assert "".join(d["delta"]["partial_json"] for d in deltas[2:4]) == '{"a": 1}'
    assert [d["index"] for d in deltas] == [0, 0, 1, 1, 2]
    assert [d["index"] for name, d in events if name == "content_block_stop"] == [0, 1, 2]
    message_delta = events[-2][1]
    assert message_delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert message_delta["usage"]["output_tokens"] == 6 and message_delta["usage"]["input_tokens"] == 33
    assert (rec.input_tokens, rec.output_tokens) == (33, 6)
    assert meter.done and meter.usage_seen


def test_openai_error_chunk_becomes_an_anthropic_error_event() -> None:
    meter = translate.OpenAIToAnthropicStream(record("openai"), input_estimate=3)
    meter.handle(OPENAI_TOOL_STREAM[0])
    meter.handle(OPENAI_TOOL_STREAM[1])
    error = {"error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}}
    [(name, data)] = parse_named(meter.handle(sse(None, error)))
    assert name == "error" and data["error"] == {"type": "api_error", "message": "The server had an error"}
    assert meter.failed and not meter.done and meter.chunks == 1
    [(name, data)] = parse_named(meter.error_event("the openai provider stream failed"))
    assert name == "error" and data["error"]["message"] == "the openai provider stream failed"


def test_openai_stream_without_usage_still_ends_properly() -> None:
    meter = translate.OpenAIToAnthropicStream(record("openai"), input_estimate=3)
    stream = [
        openai_chunk({"role": "assistant", "content": ""}),
        openai_chunk({"content": "Hi"}),
        openai_chunk({}, "length"),
    ]
    events = [e for event in [*stream, sse(None, b"[DONE]")] for e in parse_named(meter.handle(event))]
    assert [n for n, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 1  # counted from the deltas when usage never came
