"""Unit tests of batch input validation (no network)."""

from __future__ import annotations

import pytest

from parley_jobs.jsonl import parse_batch_file
from parley_kit.errors import BadRequest

from .conftest import chat_line, jsonl


def test_a_good_file_parses_into_numbered_requests() -> None:
    content = jsonl([chat_line("a"), chat_line("b")]) + b"\n"  # a blank line at the end is harmless
    lines = parse_batch_file(content, max_lines=10)
    assert [(line.line, line.custom_id, line.url) for line in lines] == [
        (1, "a", "/v1/chat/completions"),
        (2, "b", "/v1/chat/completions"),
    ]
    assert lines[0].body["model"] == "gpt-4o-mini"


def test_a_utf8_bom_is_accepted() -> None:
    assert len(parse_batch_file(b"\xef\xbb\xbf" + jsonl([chat_line("a")]), max_lines=10)) == 1


@pytest.mark.parametrize(
    ("bad_line", "code", "says"),
    [
        ("{not json", "invalid_json_line", "not valid JSON"),
        ("[1, 2]", "invalid_json_line", "JSON object"),
        ({**chat_line("x"), "custom_id": ""}, "invalid_custom_id", "custom_id"),
        ({k: v for k, v in chat_line("x").items() if k != "custom_id"}, "invalid_custom_id", "custom_id"),
        ({**chat_line("x"), "method": "GET"}, "invalid_method", "POST"),
        ({**chat_line("x"), "url": "/v1/completions"}, "invalid_url", "url must be one of"),
        ({**chat_line("x"), "body": "text"}, "invalid_body", "body must be a JSON object"),
        ({**chat_line("x"), "body": {"messages": []}}, "missing_model", "body.model"),
        (chat_line("x", stream=True), "invalid_body", "stream"),
        (chat_line("x", stream="false"), "invalid_body", "stream"),
        ({**chat_line("x"), "extra": 1}, "invalid_json_line", "unknown field"),
    ],
)
def test_a_bad_line_is_refused_naming_its_number(bad_line: object, code: str, says: str) -> None:
    content = jsonl([chat_line("first"), bad_line])
    with pytest.raises(BadRequest) as caught:
        parse_batch_file(content, max_lines=10)
    assert caught.value.detail.startswith("line 2: ")
    assert says in caught.value.detail
    assert caught.value.code == code


def test_a_duplicate_custom_id_names_both_lines() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_batch_file(jsonl([chat_line("a"), chat_line("b"), chat_line("a")]), max_lines=10)
    assert caught.value.code == "duplicate_custom_id"
    assert caught.value.detail.startswith("line 3: ") and "line 1" in caught.value.detail


def test_every_line_must_use_the_same_url() -> None:
    embedding = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    with pytest.raises(BadRequest) as caught:
        parse_batch_file(jsonl([chat_line("a"), embedding]), max_lines=10)
    assert caught.value.code == "mismatched_url"


def test_more_lines_than_allowed_are_refused() -> None:
    parse_batch_file(jsonl([chat_line(str(i)) for i in range(3)]), max_lines=3)
    with pytest.raises(BadRequest) as caught:
        parse_batch_file(jsonl([chat_line(str(i)) for i in range(4)]), max_lines=3)
    assert caught.value.code == "too_many_requests_in_file"


@pytest.mark.parametrize("content", [b"", b"\n\n", b"\xff\xfe{}"])
def test_empty_or_binary_files_are_refused(content: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_batch_file(content, max_lines=10)
