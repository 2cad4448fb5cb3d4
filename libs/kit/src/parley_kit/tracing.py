"""W3C trace context: one trace id per request, carried across HTTP (`traceparent`) and AMQP headers."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The current trace and span, plus the request id a client may quote to support."""

    trace_id: str
    span_id: str
    request_id: str

    def child_traceparent(self) -> str:
        """A `traceparent` for an outbound call: same trace, a fresh span id."""
        return f"00-{self.trace_id}-{os.urandom(8).hex()}-01"


_current: ContextVar[TraceContext | None] = ContextVar("parley_trace", default=None)


def parse_traceparent(header: str | None) -> tuple[str, str] | None:
    """Return (trace_id, parent_span_id) from a valid `traceparent`, or None (all-zero ids are invalid)."""
    if not header:
        return None
    match = _TRACEPARENT.match(header.strip().lower())
    if not match or match[1] == "0" * 32 or match[2] == "0" * 16:
        return None
    return match[1], match[2]


def start(traceparent: str | None = None, request_id: str | None = None) -> TraceContext:
    """Begin a unit of work (a request or a message), continuing the caller's trace when it sent one."""
    parsed = parse_traceparent(traceparent)
    trace_id = parsed[0] if parsed else os.urandom(16).hex()
    context = TraceContext(trace_id, os.urandom(8).hex(), _clean_request_id(request_id) or f"req_{trace_id[:24]}")
    _current.set(context)
    return context


def current() -> TraceContext | None:
    """The trace context of the work in progress, if any."""
    return _current.get()


@contextmanager
def use(context: TraceContext | None) -> Iterator[None]:
    """Run a block under a captured context: work that outlives its request (close callbacks, other threads)."""
    token = _current.set(context)
    try:
        yield
    finally:
        _current.reset(token)


def clear() -> None:
    """Forget the current context once the unit of work is done."""
    _current.set(None)


def outbound_headers() -> dict[str, str]:
    """Headers that carry the current trace to the next hop (HTTP request or AMQP message)."""
    context = _current.get()
    if context is None:
        return {}
    return {"traceparent": context.child_traceparent(), "x-request-id": context.request_id}


def _clean_request_id(value: str | None) -> str | None:
    """Accept a client request id only if it is short and printable, so it is safe to log and echo."""
    if value and len(value) <= 128 and value.isascii() and value.isprintable():
        return value
    return None
