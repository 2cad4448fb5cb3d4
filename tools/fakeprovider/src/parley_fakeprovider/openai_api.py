"""OpenAI wire format: chat completions (plain and SSE), embeddings, models, errors and auth."""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Mapping
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
    embedding,
    make_reply,
    split_tokens,
    tool_arguments,
)

DEFAULT_DIMENSIONS = 64
FINGERPRINT = "fp_parleyfake"
FINISH = {"stop": "stop", "length": "length", "stop_sequence": "stop"}
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error"}
_TYPES |= {404: "invalid_request_error", 429: "requests"}
_MESSAGES = {
    400: "Invalid request.",
    401: "Incorrect API key provided.",
    403: "You are not allowed to perform this request.",
    404: "The requested resource does not exist.",
    429: "Rate limit reached for requests. Please try again in 1s.",
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The engine is currently overloaded, please try again later.",
}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def error_response(err: ApiError) -> Response:
    """Render an ApiError as OpenAI's ``{"error": {message, type, param, code}}``."""
    status = err.status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {
        "message": err.message or _MESSAGES.get(status, _MESSAGES[500 if status >= 500 else 400]),
        "type": kind,
        "param": err.param,
        "code": err.code or _CODES.get(status),
    }
    return Response(status, orjson.dumps({"error": error}), headers=list(err.headers))


def authenticate(environ: Mapping[str, Any], api_key: str | None) -> None:
    """Require ``Authorization: Bearer <api_key>`` when a key is configured."""
    if not api_key:
        return
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an "
                       "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                       code="missing_api_key")  # fmt: skip
    if not hmac.compare_digest(auth[7:].strip().encode(), api_key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


def _ident(prefix: str) -> str:
    """A random id in the provider's style."""
    return prefix + os.urandom(12).hex()


def _require(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A required field of the given type (400 otherwise)."""
    value = body.get(name)
    if value is None:
        raise ApiError(400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
    if not isinstance(value, kind) or isinstance(value, bool) or value in ("", []):
        raise ApiError(400, f"Invalid value for '{name}'.", param=name, code="invalid_value")
    return value


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    """OpenAI usage object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _forced_tool(tools: list[Any], choice: Any) -> dict[str, Any] | None:
    """The function a ``tool_choice`` forces (first for "required"), or None."""
    functions = [t.get("function") for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if choice == "required":
        if not functions:
            raise ApiError(400, "tool_choice 'required' needs at least one tool.", param="tool_choice")
        return functions[0]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        for function in functions:
            if function.get("name") == name:
                return function
        raise ApiError(400, f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
                       param="tool_choice")  # fmt: skip
    return None


def _prompt_text(messages: list[Any]) -> tuple[list[str], str]:
    """All texts of the conversation, and the text of the last user message."""
    texts: list[str] = []
    last_user = ""
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(400, "Invalid type for 'messages': expected objects.", param="messages")
        text = content_text(message.get("content"))
        texts.append(text)
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                texts.append(str(call["function"].get("arguments", "")))
        if message.get("role") == "user":
            last_user = text
    return texts, last_user


def chat_completions(call: Call) -> Response:
    """POST /v1/chat/completions."""
    body = call.json()
    model = _require(body, "model", str)
    texts, last_user = _prompt_text(_require(body, "messages", list))
    tools = body.get("tools") or []
    prompt_tokens = sum(count_tokens(t) for t in texts) + TOOL_DEFINITION_TOKENS * len(tools)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ApiError(400, "Invalid 'max_tokens': must be a positive integer.", param="max_tokens")
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else [s for s in stops if isinstance(s, str)]
    tool = _forced_tool(tools, body.get("tool_choice"))
    stream = bool(body.get("stream"))
    knobs = call.knobs(last_user)
    if (early := call.prelude(knobs, stream)) is not None:
        return early

    if tool is not None:
        text, finish = dump_arguments(tool_arguments(tool.get("parameters"))), "tool_calls"
    else:
        target = DEFAULT_OUTPUT_TOKENS if knobs.tokens is None else knobs.tokens
        reply = make_reply(last_user, target, max_tokens, stops)
        text, finish = reply.text, FINISH[reply.reason]
    usage = _usage(prompt_tokens, count_tokens(text))
    head = {"id": _ident("chatcmpl-"), "object": "chat.completion", "created": int(time.time()), "model": model}
    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head["object"] = "chat.completion.chunk"
        head["system_fingerprint"] = FINGERPRINT
        chunks = _stream(call, knobs, head, text, tool, finish, usage if include_usage else None)
        return Response(body=chunks, content_type=SSE_TYPE)

    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if tool is not None:
        function = {"name": tool.get("name"), "arguments": text}
        message["content"] = None
        message["tool_calls"] = [{"id": _ident("call_"), "type": "function", "function": function}]
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return json_response(
        {**head, "choices": [choice], "usage": usage, "service_tier": "default", "system_fingerprint": FINGERPRINT}
    )


def _stream(
    call: Call,
    knobs: Knobs,
    head: dict[str, Any],
    text: str,
    tool: dict[str, Any] | None,
    finish: str,
    usage: dict[str, Any] | None,
) -> StreamBody:
    """The SSE chunks of a streamed chat completion, one token per content delta."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data = {**head, "choices": [choice]}
        if usage is not None:
            data["usage"] = None  # the real API marks every chunk but the last this way
        return sse(None, data)

    if tool is None:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
    else:
        function = {"name": tool.get("name"), "arguments": ""}
        header = {"index": 0, "id": _ident("call_"), "type": "function", "function": function}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [header], "refusal": None})
    delay = knobs.chunk_delay_ms / 1000
    for fragment in split_tokens(text)[: content_limit(knobs)]:
        if not call.pause(delay):
            return "gone"
        if tool is None:
            yield chunk({"content": fragment})
        else:
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
    if (stop := interruption(knobs)) == "error":
        yield sse(None, {"error": {"message": _MESSAGES[500], "type": "server_error", "param": None, "code": None}})
        return "error"
    if stop == "cut":
        return "cut"
    yield chunk({}, finish)
    if usage is not None:
        yield sse(None, {**head, "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"
    return "completed"


def embeddings(call: Call) -> Response:
    """POST /v1/embeddings: deterministic unit vectors from a hash of each input."""
    body = call.json()
    model = _require(body, "model", str)
    raw = _require(body, "input", (str, list))
    if isinstance(raw, str) or (raw and all(isinstance(x, int) for x in raw)):
        raw = [raw]
    inputs: list[str] = []
    for item in raw:
        if isinstance(item, str) and item:
            inputs.append(item)
        elif isinstance(item, list) and item and all(isinstance(x, int) for x in item):
            inputs.append(" ".join(map(str, item)))  # token ids: one token per id, as the rule says
        else:
            raise ApiError(400, "'$.input' is invalid: expected non-empty strings or token arrays.", param="input")
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= 8192:
        raise ApiError(400, "Invalid value for 'dimensions'.", param="dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, "Invalid value for 'encoding_format': expected 'float' or 'base64'.",
                       param="encoding_format")  # fmt: skip
    if (early := call.prelude(call.knobs(" ".join(inputs)), stream=False)) is not None:
        return early
    data = []
    for index, text in enumerate(inputs):
        floats, b64 = embedding(text, dimensions)
        data.append({"object": "embedding", "index": index, "embedding": b64 if encoding == "base64" else floats})
    tokens = sum(count_tokens(t) for t in inputs)
    return json_response(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


def models(call: Call) -> Response:
    """GET /v1/models in OpenAI's list shape."""
    if (early := call.prelude(call.knobs(""), stream=False)) is not None:
        return early
    data = [{"id": i, "object": "model", "created": c, "owned_by": o} for i, o, c, _ in MODELS]
    return json_response({"object": "list", "data": data})
