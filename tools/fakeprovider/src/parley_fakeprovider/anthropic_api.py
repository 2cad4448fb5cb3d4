"""Anthropic wire format: messages (plain and named-event SSE), token counting, models, errors and auth."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from .core import (
    MODELS,
    SSE_TYPE,
    ApiError,
    Call,
    Response,
    StreamBody,
    content_limit,
    interruption,
    json_response,
    sse,
)
from .knobs import Knobs
from .text import (
    DEFAULT_OUTPUT_TOKENS,
    TOOL_DEFINITION_TOKENS,
    content_text,
    count_tokens,
    dump_arguments,
    make_reply,
    split_tokens,
    tool_arguments,
)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_MESSAGES = {
    400: "Invalid request.",
    401: "invalid x-api-key",
    403: "Your API key does not have permission to use the specified resource.",
    404: "Not found",
    429: "Number of requests has exceeded your rate limit. Please try again later.",
    500: "Internal server error",
    529: "Overloaded",
}


def error_body(status: int, message: str | None = None) -> dict[str, Any]:
    """Anthropic's ``{"type": "error", "error": {type, message}}`` for a status."""
    kind = _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    text = message or _MESSAGES.get(status, _MESSAGES[500 if status >= 500 else 400])
    return {"type": "error", "error": {"type": kind, "message": text}}


def error_response(err: ApiError) -> Response:
    """Render an ApiError in Anthropic's error shape."""
    return Response(err.status, orjson.dumps(error_body(err.status, err.message)), headers=list(err.headers))


def authenticate(environ: Mapping[str, Any], api_key: str | None) -> None:
    """Require ``x-api-key`` (or ``Authorization: Bearer``) to equal `api_key` when one is configured."""
    if not api_key:
        return
    given = environ.get("HTTP_X_API_KEY")
    if given is None and environ.get("HTTP_AUTHORIZATION", "").startswith("Bearer "):
        given = environ["HTTP_AUTHORIZATION"][7:].strip()
    if not given:
        raise ApiError(401, "x-api-key header is required")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "invalid x-api-key")


def _ident(prefix: str) -> str:
    """A random id in Anthropic's style."""
    return prefix + os.urandom(12).hex()


def _require(body: dict[str, Any], name: str, kind: type) -> Any:
    """A required field of the given type (400 otherwise)."""
    value = body.get(name)
    if value is None:
        raise ApiError(400, f"{name}: Field required")
    if not isinstance(value, kind) or isinstance(value, bool) or value in ("", []):
        raise ApiError(400, f"{name}: Input should be a valid {kind.__name__}")
    return value


def _prompt(body: dict[str, Any]) -> tuple[int, str]:
    """Input tokens of a Messages request and the text of its last user message."""
    texts = [content_text(body.get("system"))]
    last_user = ""
    for message in _require(body, "messages", list):
        if not isinstance(message, dict):
            raise ApiError(400, "messages: Input should be a list of objects")
        text = content_text(message.get("content"))
        texts.append(text)
        if message.get("role") == "user":
            last_user = text
    tools = body.get("tools") or []
    return sum(count_tokens(t) for t in texts) + TOOL_DEFINITION_TOKENS * len(tools), last_user


def _forced_tool(tools: list[Any], choice: Any) -> dict[str, Any] | None:
    """The tool a ``tool_choice`` forces (first for "any"), or None."""
    if not isinstance(choice, dict):
        return None
    named = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if choice.get("type") == "any":
        if not named:
            raise ApiError(400, "tool_choice: 'any' requires at least one tool")
        return named[0]
    if choice.get("type") == "tool":
        for tool in named:
            if tool["name"] == choice.get("name"):
                return tool
        raise ApiError(400, f"tool_choice: tool {choice.get('name')!r} was not found in tools")
    return None


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    """Anthropic usage object."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def messages(call: Call) -> Response:
    """POST /v1/messages."""
    body = call.json()
    model = _require(body, "model", str)
    max_tokens = _require(body, "max_tokens", int)
    if max_tokens < 1:
        raise ApiError(400, "max_tokens: Input should be greater than or equal to 1")
    input_tokens, last_user = _prompt(body)
    tool = _forced_tool(body.get("tools") or [], body.get("tool_choice"))
    stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str)]
    stream = bool(body.get("stream"))
    knobs = call.knobs(last_user)
    if (early := call.prelude(knobs, stream, event="message_start")) is not None:
        return early

    stop_sequence = None
    if tool is not None:
        arguments = tool_arguments(tool.get("input_schema"))
        text, stop_reason = dump_arguments(arguments), "tool_use"
        block: dict[str, Any] = {"type": "tool_use", "id": _ident("toolu_"), "name": tool["name"], "input": arguments}
    else:
        target = DEFAULT_OUTPUT_TOKENS if knobs.tokens is None else knobs.tokens
        reply = make_reply(last_user, target, max_tokens, stops)
        text, stop_reason, stop_sequence = reply.text, STOP_REASONS[reply.reason], reply.stop_sequence
        block = {"type": "text", "text": text}
    output_tokens = count_tokens(text)
    message = {
        "id": _ident("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [block],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(input_tokens, output_tokens),
    }
    if not stream:
        return json_response(message)
    return Response(body=_stream(call, knobs, message, text), content_type=SSE_TYPE)


def _stream(call: Call, knobs: Knobs, message: dict[str, Any], text: str) -> StreamBody:
    """The named SSE events of a streamed message, one token per content delta."""
    block = message["content"][0]
    usage = message["usage"]
    # Real streams start with an estimate of 1 output token; the final count comes in message_delta.
    start_usage = {**usage, "output_tokens": min(1, usage["output_tokens"])}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    yield sse("message_start", {"type": "message_start", "message": start})
    is_text = block["type"] == "text"
    opening = {"type": "text", "text": ""} if is_text else {**block, "input": {}}
    yield sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": opening})
    yield sse("ping", {"type": "ping"})
    delay = knobs.chunk_delay_ms / 1000
    for fragment in split_tokens(text)[: content_limit(knobs)]:
        if not call.pause(delay):
            return "gone"
        delta = (
            {"type": "text_delta", "text": fragment}
            if is_text
            else {"type": "input_json_delta", "partial_json": fragment}
        )
        yield sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
    if (stop := interruption(knobs)) == "error":
        yield sse("error", error_body(529))
        return "error"
    if stop == "cut":
        return "cut"
    yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    yield sse(
        "message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": usage["output_tokens"]}}
    )
    yield sse("message_stop", {"type": "message_stop"})
    return "completed"


def count_tokens_endpoint(call: Call) -> Response:
    """POST /v1/messages/count_tokens."""
    body = call.json()
    _require(body, "model", str)
    input_tokens, last_user = _prompt(body)
    if (early := call.prelude(call.knobs(last_user), stream=False)) is not None:
        return early
    return json_response({"input_tokens": input_tokens})


def models(call: Call) -> Response:
    """GET /v1/models in Anthropic's list shape (chosen when the request has ``anthropic-version``)."""
    if (early := call.prelude(call.knobs(""), stream=False)) is not None:
        return early
    data = [
        {
            "type": "model",
            "id": ident,
            "display_name": name,
            "created_at": datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for ident, owner, created, name in MODELS
        if owner == "anthropic"
    ]
    return json_response({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
