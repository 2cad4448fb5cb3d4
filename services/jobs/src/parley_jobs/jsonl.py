"""Validation of batch input files (OpenAI's `BatchRequestInput` lines), before anything is stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

from parley_kit.errors import BadRequest

Endpoint = Literal["/v1/chat/completions", "/v1/embeddings", "/v1/messages"]
BATCH_URLS: tuple[str, ...] = get_args(Endpoint)
MAX_CUSTOM_ID = 512


@dataclass(frozen=True, slots=True)
class RequestLine:
    """One validated input line."""

    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def _line_error(number: int, message: str, code: str) -> BadRequest:
    return BadRequest(f"line {number}: {message}", code=code, param="file")


def parse_request_line(number: int, raw: bytes) -> RequestLine:
    """Parse and check one JSONL line; raises BadRequest naming the line."""
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _line_error(number, "not valid JSON", "invalid_json_line") from exc
    if not isinstance(item, dict):
        raise _line_error(number, "must be a JSON object", "invalid_json_line")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise _line_error(number, f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters", "invalid_custom_id")
    if item.get("method") != "POST":
        raise _line_error(number, 'method must be "POST"', "invalid_method")
    url = item.get("url")
    if url not in BATCH_URLS:
        raise _line_error(number, f"url must be one of {', '.join(BATCH_URLS)}", "invalid_url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise _line_error(number, "body must be a JSON object", "invalid_body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _line_error(number, "body.model must be a non-empty string", "missing_model")
    if body.get("stream", False) is not False:  # true, or a non-boolean llm would refuse at run time
        raise _line_error(number, "streaming is not supported in a batch (body.stream must be false)", "invalid_body")
    unknown = set(item) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise _line_error(number, f"unknown field {sorted(unknown)[0]!r}", "invalid_json_line")
    return RequestLine(number, custom_id, url, body)


def parse_batch_file(content: bytes, *, max_lines: int) -> list[RequestLine]:
    """Every request of a batch input file, in order; raises BadRequest on the first bad line."""
    if content.startswith(b"\xef\xbb\xbf"):
        content = content[3:]  # a UTF-8 BOM from editors on Windows is harmless
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("the file is not UTF-8 text", code="invalid_file", param="file") from exc
    requests: list[RequestLine] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (and the trailing newline) carry no request
        if len(requests) >= max_lines:
            raise BadRequest(
                f"the file has more than {max_lines} requests", code="too_many_requests_in_file", param="file"
            )
        request = parse_request_line(number, raw)
        if request.custom_id in seen:
            raise _line_error(
                number,
                f"duplicate custom_id (first used on line {seen[request.custom_id]}); each must be unique",
                "duplicate_custom_id",
            )
        if requests and request.url != requests[0].url:
            raise _line_error(
                number, f"url {request.url} differs from line {requests[0].line}'s {requests[0].url}", "mismatched_url"
            )
        seen[request.custom_id] = number
        requests.append(request)
    if not requests:
        raise BadRequest("the file holds no requests", code="empty_file", param="file")
    return requests
