"""ECS JSON logs on stdout and, when configured, to Logstash over TCP behind a queue."""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import queue
import socket
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

from . import tracing

# Attributes every LogRecord has; anything else was passed through `extra=` and becomes an ECS field.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_LEVELS = {"WARNING": "warn", "CRITICAL": "critical"}


class EcsFormatter(logging.Formatter):
    """Formats a record as one ECS JSON object; `extra` keys with dots become nested fields."""

    def __init__(self, service_name: str, version: str, environment: str) -> None:
        super().__init__()
        self._static = {
            "service": {"name": service_name, "version": version, "environment": environment},
            "host": {"name": socket.gethostname()},
            "ecs": {"version": "8.11.0"},
        }

    def to_dict(self, record: logging.LogRecord) -> dict[str, Any]:
        """The ECS document for a record."""
        doc: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "message": record.getMessage(),
            "log": {"level": _LEVELS.get(record.levelname, record.levelname.lower()), "logger": record.name},
            **self._static,
        }
        context = tracing.current()
        if context is not None:
            doc["trace"] = {"id": context.trace_id}
            doc["span"] = {"id": context.span_id}
            doc["http.request.id"] = context.request_id
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["error.type"] = record.exc_info[0].__name__
            doc["error.message"] = str(record.exc_info[1])
            doc["error.stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        return _nest(doc)

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        return orjson.dumps(self.to_dict(record), default=str).decode()


class LogstashEcsFormatter(EcsFormatter):
    """The same document as bytes, which python-logstash's `makePickle` expects."""

    def format(self, record: logging.LogRecord) -> bytes:  # type: ignore[override]
        """One JSON document (the handler appends the newline for json_lines)."""
        return orjson.dumps(self.to_dict(record), default=str)


class _TraceCapturingQueueHandler(logging.handlers.QueueHandler):
    """Captures the trace context (a contextvar) on the caller's thread before queueing."""

    def enqueue(self, record: logging.LogRecord) -> None:
        """Queue the record, or drop it when the queue is full: a request never waits on Logstash."""
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            pass  # the default would print a traceback to stderr for every record dropped

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """Attach the caller's trace context (the same three fields stdout gets); the listener thread has none."""
        context = tracing.current()
        if context is not None and "trace.id" not in vars(record):
            record.__dict__.update(
                {"trace.id": context.trace_id, "span.id": context.span_id, "http.request.id": context.request_id}
            )
        return record


class _BoundedQueueListener(logging.handlers.QueueListener):
    """A listener whose `stop()` gives the backlog a few seconds to drain, then drops it, even with a full queue."""

    drain_seconds = 5.0

    def enqueue_sentinel(self) -> None:
        """Queue the stop marker; the stdlib's `put_nowait` raises `queue.Full` when Logstash has stalled."""
        deadline = time.monotonic() + self.drain_seconds
        while not self.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
                self.queue.task_done()
        self.queue.put(self._sentinel, timeout=self.drain_seconds)


_access = logging.getLogger("parley.access")


def access(method: str, path: str, status: int, duration_ns: int) -> None:
    """One ECS access line for an answered request (the Flask hook, the gateway's proxy and llm's plain calls)."""
    _access.info(
        "%s %s %s",
        method,
        path,
        status,
        extra={
            "http.request.method": method,
            "url.path": path,
            "http.response.status_code": status,
            "event.duration": duration_ns,
            "event.outcome": "success" if status < 400 else "failure",
        },
    )


def _nest(doc: dict[str, Any]) -> dict[str, Any]:
    """Turn dotted keys (`http.request.method`) into nested ECS objects."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if "." not in key or key == "@timestamp":
            out[key] = value
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return out


_listener: logging.handlers.QueueListener | None = None
_queue_handler: logging.Handler | None = None


def _stop_shipping() -> None:
    """Stop the Logstash listener (flushing its queue) and close the TCP connection it holds."""
    global _listener, _queue_handler
    if _queue_handler is not None:
        logging.getLogger().removeHandler(_queue_handler)
        _queue_handler = None
    if _listener is not None:
        _listener.stop()
        for handler in _listener.handlers:
            handler.close()
        _listener = None


def configure(
    service_name: str,
    version: str,
    environment: str,
    level: str = "INFO",
    logstash_host: str | None = None,
    logstash_port: int = 5000,
) -> None:
    """Route all logging to ECS JSON on stdout, plus Logstash when an address is given."""
    global _listener, _queue_handler
    _stop_shipping()
    root = logging.getLogger()
    for handler in list(root.handlers):  # only ours: a test runner's capture handlers stay
        if getattr(handler, "parley", False):
            root.removeHandler(handler)
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(EcsFormatter(service_name, version, environment))
    stdout.parley = True  # type: ignore[attr-defined]
    root.addHandler(stdout)
    if logstash_host:
        from logstash import TCPLogstashHandler  # python-logstash

        shipper = TCPLogstashHandler(logstash_host, logstash_port)
        shipper.setFormatter(LogstashEcsFormatter(service_name, version, environment))
        # python-logstash sends on the caller's thread with a connect timeout: a queue keeps requests from waiting.
        log_queue: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=10_000)
        _queue_handler = _TraceCapturingQueueHandler(log_queue)
        root.addHandler(_queue_handler)
        _listener = _BoundedQueueListener(log_queue, shipper, respect_handler_level=True)
        _listener.start()
    root.setLevel(level.upper())
    for noisy in ("urllib3", "httpx", "httpx2", "httpcore", "openai", "anthropic", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pika logs every failed connect at ERROR with a traceback; our Consumer/Publisher report broker trouble.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


def shutdown() -> None:
    """Flush the Logstash queue and close its connection (at process exit); stdout logging goes on."""
    _stop_shipping()
