"""W3C trace context: parsing, continuing a caller's trace, fresh spans per hop, request id sanitising."""

from __future__ import annotations

import pytest

from parley_kit import tracing

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_parse_valid_traceparent() -> None:
    assert tracing.parse_traceparent(f"00-{TRACE}-{SPAN}-01") == (TRACE, SPAN)
    assert tracing.parse_traceparent(f"  00-{TRACE}-{SPAN}-00\n") == (TRACE, SPAN)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        f"01-{TRACE}-{SPAN}-01",  # unknown version with the 00 layout
        f"00-{TRACE[:-1]}-{SPAN}-01",  # short trace id
        f"00-{TRACE}-{SPAN}x-01",
        f"00-{TRACE}-{SPAN}-1",
        f"00-{TRACE}-{SPAN}",
        f"00-{'g' * 32}-{SPAN}-01",
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id is invalid
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id is invalid
    ],
)
def test_parse_rejects_malformed_or_zero_ids(header: str | None) -> None:
    assert tracing.parse_traceparent(header) is None


def test_start_continues_the_callers_trace_with_a_new_span() -> None:
    context = tracing.start(f"00-{TRACE}-{SPAN}-01", "client-req-1")
    assert context.trace_id == TRACE
    assert context.span_id != SPAN and len(context.span_id) == 16
    assert context.request_id == "client-req-1"
    assert tracing.current() is context


def test_start_without_a_caller_begins_a_new_trace() -> None:
    first = tracing.start(None)
    second = tracing.start("00-not-a-trace")
    assert len(first.trace_id) == 32 and int(first.trace_id, 16) != 0
    assert first.trace_id != second.trace_id
    assert first.request_id == f"req_{first.trace_id[:24]}"


def test_clear_forgets_the_context() -> None:
    tracing.start()
    tracing.clear()
    assert tracing.current() is None
    assert tracing.outbound_headers() == {}


def test_each_outbound_header_is_a_new_span_of_the_same_trace() -> None:
    context = tracing.start(f"00-{TRACE}-{SPAN}-01", "r-1")
    spans = set()
    for _ in range(5):
        headers = tracing.outbound_headers()
        assert headers["x-request-id"] == "r-1"
        parsed = tracing.parse_traceparent(headers["traceparent"])
        assert parsed is not None and parsed[0] == TRACE
        assert headers["traceparent"].endswith("-01")
        spans.add(parsed[1])
    assert len(spans) == 5
    assert context.span_id not in spans


@pytest.mark.parametrize(
    "request_id",
    ["", "a" * 129, "bad\nline", "tab\there", "caf\u00e9", "\x1b[31mred"],
)
def test_unsafe_request_ids_are_replaced(request_id: str) -> None:
    context = tracing.start(None, request_id)
    assert context.request_id == f"req_{context.trace_id[:24]}"


def test_safe_request_id_is_kept() -> None:
    value = "Req-123_abc.def:" + "x" * 100
    assert tracing.start(None, value).request_id == value
