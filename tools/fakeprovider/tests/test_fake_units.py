"""Unit tests of the token rule, deterministic text and knob parsing (no server)."""

from __future__ import annotations

import base64
import struct

import pytest

from parley_fakeprovider import count_tokens
from parley_fakeprovider import knobs as knobs_mod
from parley_fakeprovider.text import content_text, embedding, make_reply, split_tokens, tool_arguments


def test_count_tokens_is_whitespace_words() -> None:
    assert count_tokens("") == 0
    assert count_tokens("  hello   world \n again\t") == 3


@pytest.mark.parametrize("text", ["", "one", "Parley fake reply to: a b", '{"a": 1, "b": "x y"}'])
def test_split_tokens_round_trips(text: str) -> None:
    assert "".join(split_tokens(text)) == text
    assert len(split_tokens(text)) == count_tokens(text)


def test_reply_is_deterministic_and_sized() -> None:
    first = make_reply("hello there #fake:tokens=3 world", 30, None, [])
    assert first == make_reply("hello there #fake:tokens=3 world", 30, None, [])
    assert first.text.startswith("Parley fake reply to: hello there world ")
    assert count_tokens(first.text) == 30 and first.reason == "stop"
    capped = make_reply("hello", 30, 5, [])
    assert capped.text == "Parley fake reply to: hello" and capped.reason == "length"
    assert make_reply("hello", 0, None, []).text == ""


def test_reply_stops_at_first_stop_sequence() -> None:
    reply = make_reply("hello", 16, None, ["to:", "fake"])
    assert reply == ("Parley", "stop_sequence", "fake")


def test_content_text_flattens_parts_and_blocks() -> None:
    blocks = [
        {"type": "text", "text": "a b"},
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "c"}]},
        {"type": "tool_use", "id": "t", "name": "f", "input": {"x": 1}},
        {"type": "image_url", "image_url": {"url": "data:"}},
    ]
    assert content_text(blocks) == 'a b c {"x": 1}'
    assert content_text(None) == ""


def test_tool_arguments_follow_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "where": {"type": "object", "properties": {"lat": {"type": "number"}}, "required": ["lat"]},
            "optional": {"type": "boolean"},
        },
        "required": ["city", "unit", "days", "tags", "where"],
    }
    assert tool_arguments(schema) == {
        "city": "fake-city",
        "unit": "celsius",
        "days": 42,
        "tags": ["fake-tags"],
        "where": {"lat": 1.5},
    }


def test_embedding_float_and_base64_agree() -> None:
    floats, b64 = embedding("hello", 8)
    assert floats == list(struct.unpack("<8f", base64.b64decode(b64)))
    assert abs(sum(v * v for v in floats) - 1) < 1e-5
    assert embedding("hello", 8) == (floats, b64) and embedding("other", 8)[0] != floats


def test_knob_parsing() -> None:
    assert knobs_mod.from_text("hi #fake:tokens=3 #fake:hang") == {"tokens": 3, "hang": True}
    assert knobs_mod.from_headers({"HTTP_X_FAKE_CHUNK_DELAY_MS": "5", "HTTP_HOST": "x"}) == {"chunk_delay_ms": 5}
    assert knobs_mod.from_env({"FAKE_PROVIDER_ERROR": "529", "FAKE_PROVIDER_URL": "x"}) == {"error": 529}
    assert knobs_mod.defaults({"latency_ms": 7, "api_key": "k"}, environ={}) == {"latency_ms": 7}
    with pytest.raises(knobs_mod.KnobError, match="unknown"):
        knobs_mod.from_text("#fake:tokenz=3")
    with pytest.raises(knobs_mod.KnobError, match="bad value"):
        knobs_mod.from_text("#fake:error=200")
