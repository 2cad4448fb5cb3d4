"""Deterministic reply text, tool arguments, embeddings and the fake token rule.

The token rule (the only one the fake provider uses, so tests can predict usage exactly):

* A token is one whitespace-separated word: ``count_tokens(text) == len(text.split())``.
* Input tokens are the words of every text in the request: the system prompt and each
  message's content (a string, or the ``text`` of its parts/blocks, including tool results
  and the JSON of earlier tool calls), plus ``TOOL_DEFINITION_TOKENS`` per offered tool.
  Knob directives such as ``#fake:tokens=3`` are ordinary words and count too.
* Output tokens are the words of the produced text (or of the tool-call arguments JSON).
  Streams send exactly one word per content delta (with its leading space), so counting
  non-empty content deltas counts output tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from base64 import b64encode
from collections.abc import Iterable
from typing import Any, NamedTuple

DEFAULT_OUTPUT_TOKENS = 16
TOOL_DEFINITION_TOKENS = 10
ECHO_WORDS = 6
_HEAD = ("Parley", "fake", "reply", "to:")
# 53 is prime, so the stride below visits every word before repeating.
_VOCAB = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar "
    "papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basalt cedar "
    "dune ember fjord granite harbor island jasper kelp lagoon meadow nectar orchid pebble quartz "
    "river saffron timber umber valley willow xenon yarrow zephyr"
).split()
_FRAGMENT = re.compile(r"\s*\S+")


def count_tokens(text: str) -> int:
    """Count tokens in `text`: one token per whitespace-separated word."""
    return len(text.split())


def split_tokens(text: str) -> list[str]:
    """Split `text` into per-token fragments (each word with its leading whitespace)."""
    return _FRAGMENT.findall(text)


def _seed(text: str) -> int:
    """Stable 64-bit seed (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def reply_words(prompt: str, n: int) -> list[str]:
    """Return the first `n` words of the deterministic reply to `prompt`."""
    echo = [w for w in prompt.split() if not w.startswith("#fake:")][:ECHO_WORDS]
    words = [*_HEAD, *echo][:n]
    start = _seed(prompt)
    words.extend(_VOCAB[(start + i * 7) % len(_VOCAB)] for i in range(n - len(words)))
    return words


class Reply(NamedTuple):
    """A produced reply: its text, why it ended, and the stop sequence that ended it."""

    text: str
    reason: str  # "stop", "length" or "stop_sequence"
    stop_sequence: str | None


def make_reply(prompt: str, target: int, max_tokens: int | None, stops: Iterable[str]) -> Reply:
    """Build the reply of `target` words, capped by `max_tokens` and cut at the first stop sequence."""
    n = target if max_tokens is None else min(target, max_tokens)
    text = " ".join(reply_words(prompt, n))
    cut, found = len(text), None
    for stop in stops:
        at = text.find(stop) if stop else -1
        if 0 <= at < cut:
            cut, found = at, stop
    if found is not None:
        # Trailing spaces would be lost by split_tokens, so strip them to keep stream == non-stream.
        return Reply(text[:cut].rstrip(), "stop_sequence", found)
    return Reply(text, "length" if n < target else "stop", None)


def content_text(content: Any) -> str:
    """Flatten an OpenAI/Anthropic message content (string or parts/blocks) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict):
            if isinstance(block.get("text"), str):
                parts.append(block["text"])
            if "content" in block:  # Anthropic tool_result
                parts.append(content_text(block["content"]))
            if block.get("type") == "tool_use":
                parts.append(dump_arguments(block.get("input") or {}))
    return " ".join(p for p in parts if p)


def dump_arguments(arguments: Any) -> str:
    """Serialise tool arguments the way the fake emits them (spaces after separators, so words split)."""
    return json.dumps(arguments, ensure_ascii=False)


def _value_for(name: str, schema: Any) -> Any:
    """Deterministic value for one JSON-schema property."""
    if not isinstance(schema, dict):
        return f"fake-{name}"
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _value_for(name, schema[key][0])
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return tool_arguments(schema)
    if kind == "array":
        return [_value_for(name, schema.get("items", {}))]
    return {"integer": 42, "number": 1.5, "boolean": True, "null": None}.get(kind, f"fake-{name}")


def tool_arguments(schema: Any) -> dict[str, Any]:
    """Deterministic arguments for a tool's JSON schema: one value per required property."""
    if not isinstance(schema, dict):
        return {}
    props = schema.get("properties") or {}
    required = schema.get("required") or []
    return {name: _value_for(name, props.get(name)) for name in required if isinstance(name, str)}


def embedding(text: str, dimensions: int) -> tuple[list[float], str]:
    """Unit-length float32 vector derived from `text`, as a float list and as base64 (little-endian)."""
    raw = hashlib.shake_256(text.encode()).digest(dimensions * 4)
    values = [v / 2147483648.0 for v in struct.unpack(f"<{dimensions}i", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    # Round-trip through float32 so the float and base64 forms carry identical numbers.
    return list(struct.unpack(f"<{dimensions}f", packed)), b64encode(packed).decode()
