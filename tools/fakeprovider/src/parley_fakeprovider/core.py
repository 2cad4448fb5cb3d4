"""Shared plumbing: responses, API errors, client-aware pauses, dropped connections and stats."""

from __future__ import annotations

import select
import socket
import time
from collections import Counter
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import gevent
import orjson
from gevent.monkey import get_original

from . import knobs as knobs_mod
from .knobs import HANG_CAP_SECONDS, Knobs

Outcome = Literal["completed", "cut", "error", "gone"]
StreamBody = Generator[bytes, None, Outcome]
WATCH_INTERVAL = 0.25
# gevent replaces select.poll with a blocking-style version; a zero-timeout native poll is what we want.
_native_poll = get_original("select", "poll")
# A FIN from the client shows as POLLRDHUP (Linux), a RST as POLLHUP/POLLERR.
_POLL_GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)
SSE_TYPE = "text/event-stream; charset=utf-8"
GARBAGE = b"{this is not JSON: <html>parley fake garbage</html>"

# (id, owned_by, created, display name) of the models GET /v1/models lists.
MODELS = (
    ("gpt-4o-mini", "openai", 1721172741, "GPT-4o mini"),
    ("gpt-4.1-mini", "openai", 1744318173, "GPT-4.1 mini"),
    ("gpt-5-mini", "openai", 1754425928, "GPT-5 mini"),
    ("text-embedding-3-small", "openai", 1705948997, "text-embedding-3-small"),
    ("claude-sonnet-4-6", "anthropic", 1771286400, "Claude Sonnet 4.6"),
    ("claude-haiku-4-5", "anthropic", 1759276800, "Claude Haiku 4.5"),
)


class ApiError(Exception):
    """An error answered in the calling API's own error shape."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message or str(status))
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


@dataclass(slots=True)
class Response:
    """What a handler answers: a JSON/bytes body, a stream generator, or a dropped connection."""

    status: int = 200
    body: bytes | StreamBody = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    drop: bool = False


def json_response(data: Any, status: int = 200) -> Response:
    """A JSON response."""
    return Response(status, orjson.dumps(data))


def sse(event: str | None, data: Any) -> bytes:
    """One SSE frame: data-only when `event` is None, else a named event."""
    if event is None:
        return b"data: " + orjson.dumps(data) + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _hung_up(fd: int) -> bool:
    """Whether the client has closed its end (a native zero-timeout poll: one syscall, no fd limit)."""
    if fd < 0:
        return True
    poller = _native_poll()
    poller.register(fd, select.POLLIN | _POLL_GONE)
    return any(events & _POLL_GONE for _, events in poller.poll(0))


def pause(environ: Mapping[str, Any], seconds: float) -> bool:
    """Wait `seconds`, returning False once the client hangs up (noticed within WATCH_INTERVAL)."""
    sock = environ.get("gunicorn.socket")
    deadline = time.monotonic() + seconds
    # Sleeping in slices and polling costs far less CPU per stream chunk than a watched wait.
    while (remaining := deadline - time.monotonic()) > 0:
        gevent.sleep(min(remaining, WATCH_INTERVAL))
        if sock is not None and _hung_up(sock.fileno()):
            return False
    return True


def drop(environ: Mapping[str, Any]) -> None:
    """Close the client connection abruptly, whatever was (or was not) sent."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        raise ConnectionAbortedError("fake provider dropped the connection")
    try:
        # A FIN, not a RST: the client still reads every byte already sent, then sees EOF.
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Stats:
    """Per-process counters exposed by GET /_fake/stats."""

    def __init__(self) -> None:
        """Start with zeroed counters."""
        self.reset()

    def reset(self) -> None:
        """Zero every counter."""
        self.started_at = time.time()
        self.requests: Counter[str] = Counter()
        self.responses: Counter[str] = Counter()
        self.streams_started = 0
        self.streams_completed = 0
        self.streams_disconnected = 0
        self.streams_cut = 0
        self.streams_errored = 0
        self.requests_abandoned = 0
        self.connections_dropped = 0
        self.last_disconnect_at: float | None = None
        self.last_request_headers: dict[str, str] = {}

    def record_request(self, endpoint: str, environ: Mapping[str, Any]) -> None:
        """Count a request and remember its headers."""
        self.requests[endpoint] += 1
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(key):
                headers[key.replace("_", "-").lower()] = environ[key]
        self.last_request_headers = headers

    def client_gone(self, streaming: bool) -> None:
        """Record that a client went away before its answer was complete."""
        if streaming:
            self.streams_disconnected += 1
        else:
            self.requests_abandoned += 1
        self.last_disconnect_at = time.time()

    def snapshot(self) -> dict[str, Any]:
        """All counters as a JSON-ready dict."""
        return {
            "started_at": self.started_at,
            "requests": dict(self.requests),
            "responses": dict(self.responses),
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_disconnected": self.streams_disconnected,
            "streams_cut": self.streams_cut,
            "streams_errored": self.streams_errored,
            "requests_abandoned": self.requests_abandoned,
            "connections_dropped": self.connections_dropped,
            "last_disconnect_at": self.last_disconnect_at,
            "last_request_headers": self.last_request_headers,
        }

    def track(self, body: StreamBody, environ: Mapping[str, Any]) -> Iterator[bytes]:
        """Relay a stream body chunk by chunk, counting how it ends."""
        self.streams_started += 1
        try:
            outcome = yield from body
        except GeneratorExit:
            # The server closes the body early only when writing to the client failed.
            self.client_gone(streaming=True)
            raise
        if outcome == "completed":
            self.streams_completed += 1
        elif outcome == "gone":
            self.client_gone(streaming=True)
        elif outcome == "error":
            self.streams_errored += 1
        else:
            self.streams_cut += 1
            drop(environ)


class Call:
    """One API request as seen by a handler: its body, its knobs and the client connection."""

    __slots__ = ("environ", "global_knobs", "stats")

    def __init__(self, environ: dict[str, Any], global_knobs: Knobs, stats: Stats) -> None:
        """Wrap a WSGI environ with the process-wide knobs and stats."""
        self.environ = environ
        self.global_knobs = global_knobs
        self.stats = stats

    def json(self) -> dict[str, Any]:
        """The request body as a JSON object (400 otherwise)."""
        stream = self.environ["wsgi.input"]
        length = self.environ.get("CONTENT_LENGTH")
        raw = stream.read(int(length)) if length else stream.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"We could not parse the JSON body of your request: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return body

    def knobs(self, text: str) -> Knobs:
        """Effective knobs: process-wide ones, then x-fake-* headers, then directives in `text`."""
        overrides = knobs_mod.from_headers(self.environ)
        overrides.update(knobs_mod.from_text(text))
        return knobs_mod.apply(self.global_knobs, overrides)

    def pause(self, seconds: float) -> bool:
        """Wait, noticing a client hang-up (see `pause`)."""
        return pause(self.environ, seconds)

    def prelude(self, knobs: Knobs, stream: bool, event: str | None = None) -> Response | None:
        """Apply the knobs that act before any answer; a Response means "answer this instead".

        `event` names the SSE event that carries streamed garbage (Anthropic clients skip unnamed ones).
        """
        if knobs.hang:
            if self.pause(HANG_CAP_SECONDS):
                self.stats.connections_dropped += 1
            else:
                self.stats.client_gone(streaming=False)
            return Response(drop=True)
        if not self.pause(knobs.latency_ms / 1000):
            self.stats.client_gone(streaming=False)
            return Response(drop=True)
        if knobs.error is not None:
            retry = (("retry-after", str(knobs.retry_after)),) if knobs.error == 429 else ()
            raise ApiError(knobs.error, headers=retry)
        if knobs.garbage:
            if stream:
                named = f"event: {event}\n".encode() if event else b""
                return Response(body=named + b"data: " + GARBAGE + b"\n\n", content_type=SSE_TYPE)
            return Response(body=GARBAGE)
        if knobs.cut_after is not None and not stream:
            self.stats.connections_dropped += 1
            return Response(drop=True)
        return None


def content_limit(knobs: Knobs) -> int | None:
    """How many content deltas a stream may send before it is cut or errored (None: all)."""
    limits = [n for n in (knobs.cut_after, knobs.stream_error_after) if n is not None]
    return min(limits) if limits else None


def interruption(knobs: Knobs) -> Outcome | None:
    """How a stream ends once `content_limit` is reached: "cut", "error" or normally (None)."""
    if knobs.cut_after is not None and (
        knobs.stream_error_after is None or knobs.cut_after <= knobs.stream_error_after
    ):
        return "cut"
    return "error" if knobs.stream_error_after is not None else None
