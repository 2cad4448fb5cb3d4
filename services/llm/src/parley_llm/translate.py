"""Any model from either API: OpenAI Chat Completions ⇄ Anthropic Messages, requests, answers and streams.

A client keeps its SDK whatever provider serves the model. The request is rewritten before the upstream call,
the answer after it, and a stream event by event as it arrives (never buffered). Usage is still read by the
upstream format's own stream meter, wrapped here, so translated calls reach the ledger exactly like
pass-through ones (cut streams included). What cannot be expressed in the other format gets a clear 400.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from parley_kit.errors import BadRequest, UpstreamError

from .catalog import Provider
from .relay import (
    AnthropicStreamMeter,
    OpenAIStreamMeter,
    StreamMeter,
    anthropic_tokens,
    estimate_prompt_words,
    openai_tokens,
    sse_data,
)
from .telemetry import CallRecord

# Where each family's chat endpoint lives below its SDK base URL.
UPSTREAM_PATHS = {Provider.OPENAI: "/chat/completions", Provider.ANTHROPIC: "/v1/messages"}
# Anthropic requires max_tokens; OpenAI clients may omit it. Every current Claude model can produce this many.
DEFAULT_MAX_TOKENS = 4096

FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
STOP_TO_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

Redact = Callable[[str], str]


def _bad(message: str, param: str | None = None) -> BadRequest:
    """A 400 for input that cannot be translated (the route renders it in the client's shape)."""
    return BadRequest(message, code="invalid_request", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_object(text: Any, where: str) -> dict[str, Any]:
    """Tool-call arguments (a JSON object in a string) as a dict; anything else is the client's error."""
    if text in (None, ""):
        return {}
    try:
        value = orjson.loads(text) if isinstance(text, str) else None
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise _bad(f"{where}: the arguments must be a JSON object", where)
    return value


def chat_id(message_id: Any) -> str:
    """An OpenAI completion id for an Anthropic message id (reversible, so logs can be matched)."""
    return "chatcmpl-" + str(message_id or "").removeprefix("msg_")


def message_id(completion_id: Any) -> str:
    """An Anthropic message id for an OpenAI completion id."""
    return "msg_" + str(completion_id or "").removeprefix("chatcmpl-")


# ----- OpenAI request → Anthropic request ----------------------------------------------------------------------


def openai_to_anthropic_request(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """An OpenAI chat request as an Anthropic Messages request for `model` (400 for what cannot be expressed)."""
    _refuse_openai_only(body)
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for i, message in enumerate(body.get("messages") or ()):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(f"{where}: expected an object", where)
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_openai_text(message.get("content"), f"{where}.content"))
        elif role == "user":
            _append(messages, "user", _openai_user_blocks(message.get("content"), f"{where}.content"))
        elif role == "assistant":
            _append(messages, "assistant", _openai_assistant_blocks(message, where))
        elif role == "tool":
            _append(messages, "user", [_openai_tool_result(message, where)])
        else:
            raise _bad(f"{where}.role: {role!r} is not supported for this model", f"{where}.role")
    if not messages:
        raise _bad("messages: at least one user or assistant message is required", "messages")
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": _openai_max_tokens(body)}
    if system:
        out["system"] = "\n\n".join(system)
    if (temperature := body.get("temperature")) is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise _bad("temperature: must be a number between 0 and 2", "temperature")
        # OpenAI's scale goes to 2, Anthropic's to 1: the top of the range means "as random as it gets" in both.
        out["temperature"] = min(float(temperature), 1.0)
    if (top_p := body.get("top_p")) is not None:
        if not _is_number(top_p) or not 0 <= top_p <= 1:
            raise _bad("top_p: must be a number between 0 and 1", "top_p")
        out["top_p"] = top_p
    if (stop := body.get("stop")) is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop: must be a string or a list of non-empty strings", "stop")
        if stops:
            out["stop_sequences"] = stops
    tools = body.get("tools")
    if tools:
        out["tools"] = [_openai_tool(tool, f"tools.{i}") for i, tool in enumerate(_list(tools, "tools"))]
    choice = _openai_tool_choice(body.get("tool_choice"), has_tools=bool(tools))
    if body.get("parallel_tool_calls") is False and tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(user := body.get("user"), str) and user:
        out["metadata"] = {"user_id": user}
    if body.get("stream"):
        out["stream"] = True
    return out


def _refuse_openai_only(body: dict[str, Any]) -> None:
    """Features an Anthropic model cannot honour: refused rather than silently dropped."""
    if body.get("n") not in (None, 1):
        raise _bad("n: only one choice is supported for this model", "n")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs: not supported for this model", "logprobs")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise _bad("functions: use tools and tool_choice for this model", "functions")
    if body.get("audio") is not None or "audio" in (body.get("modalities") or ()):
        raise _bad("audio: not supported for this model", "audio")
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise _bad("response_format: only {'type': 'text'} is supported for this model", "response_format")


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(f"{where}: expected a list", where)
    return value


def _openai_max_tokens(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(f"{name}: must be a positive integer", name)
            return value
    return DEFAULT_MAX_TOKENS


def _openai_text(content: Any, where: str) -> str:
    """The text of a system/developer/tool content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}.{i}: only text parts are supported here", f"{where}.{i}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{where}: expected a string or a list of text parts", where)


def _openai_user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for i, part in enumerate(_list(content, where)):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(_image_block(url, f"{where}.{i}.image_url"))
        else:
            raise _bad(f"{where}.{i}: content part type {kind!r} is not supported for this model", f"{where}.{i}")
    return blocks


def _image_block(url: Any, where: str) -> dict[str, Any]:
    """An OpenAI image URL (data: or http(s):) as an Anthropic image block."""
    if isinstance(url, str) and url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media_type, _, encoding = head.partition(";")
        if sep and encoding == "base64" and media_type.startswith("image/"):
            return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    elif isinstance(url, str) and url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad(f"{where}: expected an http(s) URL or a base64 data: URL of an image", where)


def _openai_assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, list):
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get(kind) if kind in ("text", "refusal") else None
            if not isinstance(text, str):
                raise _bad(f"{where}.content.{i}: only text and refusal parts are supported", f"{where}.content.{i}")
            if text:
                blocks.append({"type": "text", "text": text})
    elif isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif content is not None:
        raise _bad(f"{where}.content: expected a string or a list of parts", f"{where}.content")
    for j, call in enumerate(_list(message.get("tool_calls") or [], f"{where}.tool_calls")):
        at = f"{where}.tool_calls.{j}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not call.get("id"):
            raise _bad(f"{at}: expected {{id, type: 'function', function: {{name, arguments}}}}", at)
        arguments = _json_object(function.get("arguments"), f"{at}.function.arguments")
        blocks.append({"type": "tool_use", "id": str(call["id"]), "name": function["name"], "input": arguments})
    if not blocks:
        # Anthropic refuses empty turns; an empty assistant message carries nothing to translate.
        blocks.append({"type": "text", "text": "(no content)"})
    return blocks


def _openai_tool_result(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{where}.tool_call_id: required for a tool message", f"{where}.tool_call_id")
    return {
        "type": "tool_result",
        "tool_use_id": call_id,
        "content": _openai_text(message.get("content") or "", f"{where}.content"),
    }


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Add a turn, merging with the previous one of the same role (consecutive tool results form one user turn)."""
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _openai_tool(tool: Any, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise _bad(f"{where}: only {{type: 'function', function: {{name, parameters}}}} tools are supported", where)
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise _bad(f"{where}.function.parameters: expected a JSON schema object", f"{where}.function.parameters")
    out: dict[str, Any] = {"name": function["name"], "input_schema": parameters}
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def _openai_tool_choice(choice: Any, *, has_tools: bool) -> dict[str, Any] | None:
    if choice is None:
        return None
    if not has_tools:
        raise _bad("tool_choice: only allowed when tools are given", "tool_choice")
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return {"type": "tool", "name": function["name"]}
    raise _bad(
        "tool_choice: expected 'auto', 'none', 'required' or {type: 'function', function: {name}}", "tool_choice"
    )


# ----- Anthropic request → OpenAI request ----------------------------------------------------------------------


def anthropic_to_openai_request(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """An Anthropic Messages request as an OpenAI chat request for `model` (400 for what cannot be expressed)."""
    messages: list[dict[str, Any]] = []
    if (system := body.get("system")) is not None:
        text = _anthropic_text(system, "system")
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(body.get("messages") or ()):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(f"{where}: expected an object", where)
        role, content = message.get("role"), message.get("content")
        if role == "user":
            messages.extend(_anthropic_user_messages(content, f"{where}.content"))
        elif role == "assistant":
            messages.append(_anthropic_assistant_message(content, f"{where}.content"))
        else:
            raise _bad(f"{where}.role: expected 'user' or 'assistant'", f"{where}.role")
    max_tokens = body.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens: must be a positive integer", "max_tokens")
    out: dict[str, Any] = {"model": model, "messages": messages, "max_completion_tokens": max_tokens}
    for name, high in (("temperature", 1), ("top_p", 1)):
        if (value := body.get(name)) is not None:
            if not _is_number(value) or not 0 <= value <= high:
                raise _bad(f"{name}: must be a number between 0 and {high}", name)
            out[name] = value
    if (stops := body.get("stop_sequences")) is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _bad("stop_sequences: must be a list of non-empty strings", "stop_sequences")
        if stops:
            out["stop"] = stops
    tools = body.get("tools")
    if tools:
        out["tools"] = [_anthropic_tool(tool, f"tools.{i}") for i, tool in enumerate(_list(tools, "tools"))]
    if (choice := body.get("tool_choice")) is not None:
        _anthropic_tool_choice(out, choice, has_tools=bool(tools))
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream"):
        # Always ask for the usage chunk: the client's message_delta and the ledger both need real numbers.
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def _anthropic_text(content: Any, where: str) -> str:
    """The text of a system prompt or tool result: a string or a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, block in enumerate(content):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise _bad(f"{where}.{i}: only text blocks are supported here", f"{where}.{i}")
            texts.append(block["text"])
        return "\n".join(texts)
    raise _bad(f"{where}: expected a string or a list of text blocks", where)


def _anthropic_user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    """One user turn as OpenAI messages: its tool results first (they must follow the assistant's calls)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for i, block in enumerate(_list(content, where)):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.{i}"
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"), at)}})
        elif kind == "tool_result":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad(f"{at}.tool_use_id: required for a tool result", f"{at}.tool_use_id")
            text = _anthropic_text(block.get("content") or "", f"{at}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        else:
            raise _bad(f"{at}: content block type {kind!r} is not supported for this model", at)
    if parts:
        only_text = all(p["type"] == "text" for p in parts)
        results.append({"role": "user", "content": "\n".join(p["text"] for p in parts) if only_text else parts})
    return results


def _image_url(source: Any, where: str) -> str:
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return source["url"]
    raise _bad(f"{where}.source: expected a base64 or url image source", f"{where}.source")


def _anthropic_assistant_message(content: Any, where: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(_list(content, where)):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.{i}"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad(f"{at}: a tool_use block needs an id and a name", at)
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {"id": block["id"], "type": "function", "function": {"name": block["name"], "arguments": arguments}}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # another model's reasoning means nothing to an OpenAI model
        else:
            raise _bad(f"{at}: content block type {kind!r} is not supported for this model", at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _anthropic_tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or not isinstance(tool.get("name"), str):
        raise _bad(f"{where}: only custom tools {{name, description, input_schema}} are supported", where)
    schema = tool.get("input_schema") or {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise _bad(f"{where}.input_schema: expected a JSON schema object", f"{where}.input_schema")
    function: dict[str, Any] = {"name": tool["name"], "parameters": schema}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _anthropic_tool_choice(out: dict[str, Any], choice: Any, *, has_tools: bool) -> None:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "none":
        if has_tools:
            out["tool_choice"] = "none"
        return
    if not has_tools:
        raise _bad("tool_choice: only allowed when tools are given", "tool_choice")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice: expected {type: auto | any | none} or {type: 'tool', name}", "tool_choice")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False


# ----- answers --------------------------------------------------------------------------------------------------


def anthropic_to_openai_response(data: Any) -> dict[str, Any]:
    """An Anthropic message as an OpenAI chat completion."""
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise UpstreamError("the anthropic provider answered with an unexpected body", code="upstream_garbage")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    # Unusable usage shows as zeros: the ledger charges an estimate, which is not the provider's count.
    prompt, completion, cached = anthropic_tokens(data.get("usage")) or (0, 0, 0)
    return {
        "id": chat_id(data.get("id")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": STOP_TO_FINISH.get(data.get("stop_reason") or "end_turn", "stop"),
            }
        ],
        "usage": _openai_usage(prompt, completion, cached),
        "system_fingerprint": None,
    }


def _openai_usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def openai_to_anthropic_response(data: Any) -> dict[str, Any]:
    """An OpenAI chat completion as an Anthropic message."""
    choices = data.get("choices") if isinstance(data, dict) else None
    message = choices[0].get("message") if isinstance(choices, list) and choices else None
    if not isinstance(message, dict):
        raise UpstreamError("the openai provider answered with an unexpected body", code="upstream_garbage")
    content: list[dict[str, Any]] = []
    text = message.get("content") or message.get("refusal")
    if text:
        content.append({"type": "text", "text": str(text)})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}  # a model's malformed arguments: Anthropic's shape has no place for the raw text
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    prompt, completion, cached = openai_tokens(data.get("usage")) or (0, 0, 0)
    finish = choices[0].get("finish_reason")
    return {
        "id": message_id(data.get("id")),
        "type": "message",
        "role": "assistant",
        "model": data.get("model"),
        "content": content,
        "stop_reason": FINISH_TO_STOP.get(finish or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": prompt - cached,
            "output_tokens": completion,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        },
    }


# ----- streams --------------------------------------------------------------------------------------------------

_DONE = object()


def _event_data(event: bytes) -> Any:
    """The parsed `data:` of one SSE event (lines joined), `_DONE` for OpenAI's terminator, None if unreadable."""
    payload = sse_data(event)
    if payload is None:
        return None
    if payload.startswith(b"[DONE]"):
        return _DONE
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None


def _named(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data)


class _TranslatingMeter:
    """Wraps the upstream format's meter (so the ledger sees the upstream's usage) and rewrites each event.

    Reads of anything not defined here (record, chunks, usage_seen, done, failed, …) go to the wrapped meter.
    """

    def __init__(self, inner: StreamMeter, redact: Redact) -> None:
        self.inner = inner
        self.redact = redact

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def handle(self, event: bytes) -> bytes | None:
        """The client's events (joined, without the final blank line) for one upstream event, or None."""
        chunks = self.inner.chunks
        self.inner.handle(event)
        try:
            out = self.translate(_event_data(event))
        except Exception:
            self.inner.chunks = chunks  # an event never sent is not charged as a chunk
            raise
        return b"\n\n".join(out) if out else None

    def translate(self, data: Any) -> list[bytes]:
        """The client's events for one parsed upstream event."""
        raise NotImplementedError


class AnthropicToOpenAIStream(_TranslatingMeter):
    """An Anthropic event stream as OpenAI chat chunks (role chunk, deltas, finish chunk, usage chunk, [DONE])."""

    def __init__(self, record: CallRecord, *, include_usage: bool, redact: Redact = str) -> None:
        super().__init__(AnthropicStreamMeter(record), redact)
        self.include_usage = include_usage
        self.id = "chatcmpl-"
        self.model = record.upstream_model
        self.created = int(time.time())
        self.tools: dict[int, int] = {}  # Anthropic block index → OpenAI tool_calls index
        self.input_tokens = self.cached_tokens = self.output_tokens = 0

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk)

    def translate(self, data: Any) -> list[bytes]:
        """Anthropic event → OpenAI chunks."""
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "message_start":
            message = data.get("message") or {}
            self.id = chat_id(message.get("id"))
            self.model = message.get("model") or self.model
            self._read_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tools[data.get("index", 0)] = len(self.tools)
                header = {"index": index, "id": block.get("id"), "type": "function"}
                header["function"] = {"name": block.get("name"), "arguments": ""}
                return [self._chunk({"tool_calls": [header]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            index = self.tools.get(data.get("index", 0))
            if delta.get("type") == "input_json_delta" and delta.get("partial_json") and index is not None:
                fragment = {"index": index, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [fragment]})]
            return []  # thinking, signatures, citations: nothing in OpenAI's chunk shape carries them
        if kind == "message_delta":
            self._read_usage(data.get("usage"))
            stop = (data.get("delta") or {}).get("stop_reason") or "end_turn"
            return [self._chunk({}, STOP_TO_FINISH.get(stop, "stop"))]
        if kind == "message_stop":
            out = []
            if self.include_usage:
                usage = _openai_usage(self.input_tokens, self.output_tokens, self.cached_tokens)
                chunk = {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage,
                }
                out.append(b"data: " + orjson.dumps(chunk))
            out.append(b"data: [DONE]")
            return out
        if kind == "error":
            error = data.get("error") or {}
            return [self._error(str(error.get("message") or "the provider failed"), error.get("type"))]
        return []  # ping, content_block_stop

    def _read_usage(self, usage: Any) -> None:
        """message_start has the input; message_delta the cumulative output (and sometimes the input again)."""
        tokens = anthropic_tokens(usage)
        if tokens is None:
            return
        if usage.get("input_tokens") is not None:
            self.input_tokens, self.cached_tokens = tokens[0], tokens[2]
        if usage.get("output_tokens") is not None:
            self.output_tokens = tokens[1]

    def _error(self, message: str, kind: Any = None) -> bytes:
        error_type = "rate_limit_error" if kind == "rate_limit_error" else "server_error"
        error = {"message": self.redact(message), "type": error_type, "code": kind}
        return b"data: " + orjson.dumps({"error": error})

    def error_event(self, message: str) -> bytes:
        """`data: {"error": …}`, which the OpenAI SDK raises as APIError."""
        return self._error(message)


class OpenAIToAnthropicStream(_TranslatingMeter):
    """OpenAI chat chunks as Anthropic named events (message_start, blocks, message_delta, message_stop)."""

    def __init__(self, record: CallRecord, *, input_estimate: int, redact: Redact = str) -> None:
        # The upstream was asked for the usage chunk; the meter keeps it (we consume it, never forward it).
        super().__init__(OpenAIStreamMeter(record, client_wants_usage=True), redact)
        self.input_estimate = input_estimate
        self.started = False
        self.block: tuple[str, int] | None = None  # ("text", -1) or ("tool", OpenAI tool index) of the open block
        self.blocks = 0
        self.stop_reason = "end_turn"
        self.finished = False  # message_delta sent

    def translate(self, data: Any) -> list[bytes]:
        """OpenAI chunk → Anthropic events."""
        out: list[bytes] = []
        if data is _DONE:
            self._start(out, {})
            self._close(out)
            if not self.finished:
                self._finish(out, None)
            out.append(_named("message_stop", {"type": "message_stop"}))
            return out
        if not isinstance(data, dict):
            return out
        if "error" in data:
            error = data["error"] if isinstance(data["error"], dict) else {}
            kind = "rate_limit_error" if "rate_limit" in str(error.get("type") or error.get("code")) else "api_error"
            return [self._error(str(error.get("message") or "the provider failed"), kind)]
        self._start(out, data)
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") or delta.get("refusal")
            if text:
                self._open(out, ("text", -1), {"type": "text", "text": ""})
                self._delta(out, {"type": "text_delta", "text": text})
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                index = call.get("index", 0)
                if self.block != ("tool", index):
                    opening = {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": {}}
                    self._open(out, ("tool", index), opening)
                if function.get("arguments"):
                    self._delta(out, {"type": "input_json_delta", "partial_json": function["arguments"]})
            if choice.get("finish_reason"):
                self._close(out)
                self.stop_reason = FINISH_TO_STOP.get(choice["finish_reason"], "end_turn")
        if data.get("usage") and not self.finished:
            self._finish(out, data["usage"])
        return out

    def _start(self, out: list[bytes], chunk: dict[str, Any]) -> None:
        if self.started:
            return
        self.started = True
        message = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or self.record.upstream_model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # OpenAI tells the prompt size only at the end: an estimate now, the real count in message_delta.
            "usage": {"input_tokens": self.input_estimate, "output_tokens": 0},
        }
        out.append(_named("message_start", {"type": "message_start", "message": message}))

    def _open(self, out: list[bytes], block: tuple[str, int], opening: dict[str, Any]) -> None:
        if self.block == block:
            return
        self._close(out)
        self.block = block
        out.append(
            _named(
                "content_block_start", {"type": "content_block_start", "index": self.blocks, "content_block": opening}
            )
        )

    def _delta(self, out: list[bytes], delta: dict[str, Any]) -> None:
        out.append(_named("content_block_delta", {"type": "content_block_delta", "index": self.blocks, "delta": delta}))

    def _close(self, out: list[bytes]) -> None:
        if self.block is None:
            return
        out.append(_named("content_block_stop", {"type": "content_block_stop", "index": self.blocks}))
        self.block = None
        self.blocks += 1

    def _finish(self, out: list[bytes], usage: Any) -> None:
        """message_delta with the cumulative output and the real input count (the SDK keeps both)."""
        self.finished = True
        record = self.record
        tokens = openai_tokens(usage)
        if tokens is not None:
            prompt, completion, cached = tokens
            totals = {"input_tokens": prompt - cached, "output_tokens": completion, "cache_read_input_tokens": cached}
        else:
            totals = {"input_tokens": record.input_tokens or self.input_estimate, "output_tokens": self.chunks}
        delta = {"stop_reason": self.stop_reason, "stop_sequence": None}
        out.append(_named("message_delta", {"type": "message_delta", "delta": delta, "usage": totals}))

    def _error(self, message: str, kind: str = "api_error") -> bytes:
        return _named("error", {"type": "error", "error": {"type": kind, "message": self.redact(message)}})

    def error_event(self, message: str) -> bytes:
        """`event: error`, which the Anthropic SDK raises."""
        return self._error(message)


# ----- the hook the routes use ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bridge:
    """How a client of one API reaches an upstream of the other: the path, and each direction's translation."""

    client: Provider
    upstream: Provider

    @property
    def path(self) -> str:
        """The upstream endpoint below its SDK base URL."""
        return UPSTREAM_PATHS[self.upstream]

    def request(self, body: dict[str, Any], *, model: str) -> bytes:
        """The client's request body in the upstream's format (400 if it cannot be expressed)."""
        if self.client is Provider.OPENAI:
            return orjson.dumps(openai_to_anthropic_request(body, model=model))
        return orjson.dumps(anthropic_to_openai_request(body, model=model))

    def response(self, data: Any) -> bytes:
        """The upstream's parsed (non-stream) answer in the client's format."""
        convert = anthropic_to_openai_response if self.client is Provider.OPENAI else openai_to_anthropic_response
        try:
            return orjson.dumps(convert(data))
        except (AttributeError, TypeError, ValueError):  # a field of an unexpected type, deep in the answer
            raise UpstreamError(
                f"the {self.upstream.value} provider answered with an unexpected body", code="upstream_garbage"
            ) from None

    def stream_meter(self, record: CallRecord, body: dict[str, Any], *, redact: Redact = str) -> Any:
        """A meter for `relay.RelayedStream` that charges in the upstream's terms and speaks the client's format."""
        if self.client is Provider.OPENAI:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return AnthropicToOpenAIStream(record, include_usage=include_usage, redact=redact)
        return OpenAIToAnthropicStream(record, input_estimate=estimate_prompt_words(body), redact=redact)


def bridge(client: Provider, upstream: Provider) -> Bridge | None:
    """The translation from the client's API to the upstream's, or None when they speak the same one."""
    return None if client is upstream else Bridge(client, upstream)
