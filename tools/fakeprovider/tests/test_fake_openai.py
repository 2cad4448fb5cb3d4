"""The OpenAI side of the fake provider, driven by the official openai SDK and raw HTTP."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import openai
import pytest

from parley_fakeprovider import count_tokens

if TYPE_CHECKING:
    from conftest import FakeServer

USER = [{"role": "user", "content": "Tell me about the weather in Paris"}]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city", "days"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]


def test_chat_non_stream(oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    first = oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    second = oai.chat.completions.create(model="gpt-4o-mini", messages=messages)
    text = first.choices[0].message.content
    assert text is not None and text.startswith("Parley fake reply to: Tell me about the weather in ")
    assert text == second.choices[0].message.content
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion" and first.model == "gpt-4o-mini"
    assert first.choices[0].finish_reason == "stop"
    assert first.usage is not None
    assert first.usage.completion_tokens == count_tokens(text) == 16
    assert first.usage.prompt_tokens == count_tokens("Be brief. Tell me about the weather in Paris")
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_length_knobs(oai: openai.OpenAI) -> None:
    capped = oai.chat.completions.create(model="m", messages=USER, max_tokens=5)
    assert capped.choices[0].message.content == "Parley fake reply to: Tell"
    assert capped.choices[0].finish_reason == "length" and capped.usage and capped.usage.completion_tokens == 5
    messages = [{"role": "user", "content": "long please #fake:tokens=40"}]
    long = oai.chat.completions.create(model="m", messages=messages, max_completion_tokens=100)
    assert long.usage and long.usage.completion_tokens == 40 and long.choices[0].finish_reason == "stop"
    by_header = oai.chat.completions.create(model="m", messages=USER, extra_headers={"x-fake-tokens": "3"})
    assert by_header.choices[0].message.content == "Parley fake reply"
    stopped = oai.chat.completions.create(model="m", messages=USER, stop=["reply"])
    assert stopped.choices[0].message.content == "Parley fake" and stopped.choices[0].finish_reason == "stop"


def test_chat_stream_with_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(contents)
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(contents) == count_tokens(text) == 16
    assert usage_chunk.usage.prompt_tokens == count_tokens(USER[0]["content"])
    assert all(c.usage is None for c in chunks[:-1])
    plain = oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert plain.choices[0].message.content == text


def test_chat_stream_without_usage(oai: openai.OpenAI) -> None:
    with oai.chat.completions.create(model="m", messages=USER, stream=True, max_tokens=4) as stream:
        chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 4


def test_sse_framing_is_data_only(fake: FakeServer) -> None:
    body = {
        "model": "m",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 3,
    }
    with fake.http.post(f"{fake.url}/v1/chat/completions", json=body, stream=True, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.raw.read()
    assert raw.endswith(b"\n\ndata: [DONE]\n\n") and b"event:" not in raw
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    payloads = [json.loads(f.removeprefix(b"data: ")) for f in frames[:-2]]
    assert all(f.startswith(b"data: ") for f in frames[:-1])
    assert [p["choices"][0]["delta"] for p in payloads[:-1]] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "Parley"},
        {"content": " fake"},
        {"content": " reply"},
        {},
    ]
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_forced_tool_call(oai: openai.OpenAI, choice: object) -> None:
    result = oai.chat.completions.create(model="m", messages=USER, tools=WEATHER_TOOLS, tool_choice=choice)
    message = result.choices[0].message
    assert result.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls and message.tool_calls[0].type == "function"
    call = message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str) and isinstance(arguments["days"], int)
    assert result.usage and result.usage.completion_tokens == count_tokens(call.function.arguments)
    assert result.usage.prompt_tokens == count_tokens(USER[0]["content"]) + 20  # 10 per tool definition


def test_forced_tool_call_streamed(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="m",
        messages=USER,
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    header = chunks[0].choices[0].delta.tool_calls
    assert header and header[0].id and header[0].type == "function" and header[0].function
    assert header[0].function.name == "get_weather" and header[0].index == 0
    fragments = [
        c.choices[0].delta.tool_calls[0].function.arguments
        for c in chunks[1:]
        if c.choices and c.choices[0].delta.tool_calls
    ]
    arguments = json.loads("".join(f or "" for f in fragments))
    assert set(arguments) == {"city", "days"}
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == len(fragments)


def test_unknown_forced_tool_is_rejected(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model="m", messages=USER, tools=WEATHER_TOOLS, tool_choice={"type": "function", "function": {"name": "x"}}
        )


def test_embeddings(oai: openai.OpenAI) -> None:
    default = oai.embeddings.create(model="text-embedding-3-small", input=["hello world", "bye"])
    floats = oai.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "bye"], encoding_format="float"
    )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    vector = default.data[0].embedding
    assert len(vector) == 64 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)
    assert default.data[1].index == 1 and default.data[1].embedding != vector
    assert default.usage.prompt_tokens == default.usage.total_tokens == 3
    single = oai.embeddings.create(model="e", input="hello world", dimensions=16)
    assert len(single.data) == 1 and len(single.data[0].embedding) == 16


def test_embeddings_base64_wire(fake: FakeServer) -> None:
    body = {"model": "e", "input": "hi", "encoding_format": "base64"}
    data = fake.http.post(f"{fake.url}/v1/embeddings", json=body, timeout=5).json()
    assert isinstance(data["data"][0]["embedding"], str)


def test_models(oai: openai.OpenAI) -> None:
    models = {m.id: m.owned_by for m in oai.models.list()}
    assert models["gpt-4o-mini"] == "openai" and models["claude-sonnet-4-6"] == "anthropic"


def test_bad_requests_use_openai_error_shape(fake: FakeServer, oai: openai.OpenAI) -> None:
    response = fake.http.post(
        f"{fake.url}/v1/chat/completions", data=b"{nope", headers={"content-type": "application/json"}, timeout=5
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["type"] == "invalid_request_error"
    missing = fake.http.post(f"{fake.url}/v1/chat/completions", json={"messages": USER}, timeout=5)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    unknown = fake.http.post(f"{fake.url}/v1/nope", json={}, timeout=5)
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Invalid URL (POST /v1/nope)"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.BadRequestError, match="tokenz"):
        oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "#fake:tokenz=1"}])
