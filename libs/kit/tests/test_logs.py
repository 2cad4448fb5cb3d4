"""ECS JSON logs: the document's fields, stdout lines, and the Logstash path over real TCP."""

from __future__ import annotations

import json
import logging
import queue
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from parley_kit import logs, tracing
from parley_kit.testing import free_port

FORMATTER = logs.EcsFormatter("kit-test", "1.2.3", "test")


def make_record(message: str = "hello %s", *args: object, level: int = logging.INFO, **extra: object):
    """A LogRecord as `logger.log(level, message, *args, extra=extra)` would build it."""
    record = logging.getLogger("parley.test").makeRecord("parley.test", level, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_document_has_the_ecs_basics() -> None:
    doc = FORMATTER.to_dict(make_record("hello %s", "world", level=logging.WARNING))
    assert doc["message"] == "hello world"
    assert doc["@timestamp"].endswith("+00:00")
    assert doc["log"] == {"level": "warn", "logger": "parley.test"}
    assert doc["service"] == {"name": "kit-test", "version": "1.2.3", "environment": "test"}
    assert doc["host"] == {"name": socket.gethostname()}
    assert "trace" not in doc


def test_dotted_extra_keys_become_nested_objects() -> None:
    record = make_record(**{"http.request.method": "GET", "http.response.status_code": 200, "url.path": "/x"})
    doc = FORMATTER.to_dict(record)
    assert doc["http"] == {"request": {"method": "GET"}, "response": {"status_code": 200}}
    assert doc["url"] == {"path": "/x"}
    assert not any("." in key for key in doc if key != "@timestamp")


def test_trace_ids_present_inside_a_trace() -> None:
    context = tracing.start(None, "req-abc")
    doc = FORMATTER.to_dict(make_record())
    assert doc["trace"] == {"id": context.trace_id}
    assert doc["span"] == {"id": context.span_id}
    assert doc["http"]["request"]["id"] == "req-abc"


def test_exc_info_becomes_error_fields() -> None:
    try:
        raise KeyError("missing-thing")
    except KeyError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    doc = FORMATTER.to_dict(record)
    assert doc["error"]["type"] == "KeyError"
    assert "missing-thing" in doc["error"]["message"]
    assert "Traceback" in doc["error"]["stack_trace"] and "test_exc_info" in doc["error"]["stack_trace"]


def test_format_is_one_json_line_and_survives_odd_values() -> None:
    line = FORMATTER.format(make_record(**{"odd": object(), "when": time, "labels.n": 1}))
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["labels"] == {"n": 1}
    assert doc["odd"].startswith("<object")


def test_logstash_formatter_gives_bytes() -> None:
    out = logs.LogstashEcsFormatter("kit-test", "1", "test").format(make_record())
    assert isinstance(out, bytes)
    assert json.loads(out)["host"] == {"name": socket.gethostname()}


def test_configure_writes_ecs_lines_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("kit-test", "1.0", "test", level="DEBUG")
    context = tracing.start()
    logging.getLogger("parley.any").debug("debug line", extra={"event.outcome": "success"})
    logging.getLogger("pika").info("noisy library line")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["message"] for line in lines] == ["debug line"]
    assert lines[0]["trace"]["id"] == context.trace_id
    assert lines[0]["event"] == {"outcome": "success"}
    assert lines[0]["log"]["level"] == "debug"


# ----- Logstash over real TCP -----------------------------------------------------------------------------------


class LineCollector(socketserver.ThreadingTCPServer):
    """A stand-in Logstash `tcp { codec => json_lines }` input: every received line goes on a queue."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.lines: queue.Queue[dict] = queue.Queue()
        collector = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for raw in self.rfile:
                    collector.lines.put(json.loads(raw))

        super().__init__(("127.0.0.1", 0), Handler)

    def take(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The next `count` documents, waiting up to `timeout` in total."""
        deadline = time.monotonic() + timeout
        return [self.lines.get(timeout=max(0.01, deadline - time.monotonic())) for _ in range(count)]


@pytest.fixture
def logstash() -> Iterator[LineCollector]:
    """A local TCP listener speaking Logstash's json_lines input."""
    server = LineCollector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_records_reach_logstash_with_the_trace_of_the_logging_call(logstash: LineCollector) -> None:
    logs.configure("kit-test", "1.0", "test", logstash_host="127.0.0.1", logstash_port=logstash.server_address[1])
    log = logging.getLogger("parley.shipped")
    first = tracing.start()
    log.info("first %d", 1, extra={"order.id": "o-1"})
    tracing.clear()
    second = tracing.start()
    log.warning("second")
    tracing.clear()
    log.info("outside")
    try:
        raise ValueError("bad value")
    except ValueError:
        log.exception("with error")
    docs = logstash.take(4)
    assert [doc["message"] for doc in docs] == ["first 1", "second", "outside", "with error"]
    assert docs[0]["trace"]["id"] == first.trace_id
    assert docs[0]["span"]["id"] == first.span_id
    assert docs[0]["order"] == {"id": "o-1"}
    assert docs[1]["trace"]["id"] == second.trace_id
    assert docs[1]["log"]["level"] == "warn"
    assert "trace" not in docs[2]
    assert docs[3]["error"]["type"] == "ValueError"
    for doc in docs:
        assert doc["host"] == {"name": socket.gethostname()}  # an object: ES 8 ECS mappings reject a string
        assert doc["service"]["name"] == "kit-test"
        assert "@timestamp" in doc


def test_shutdown_flushes_the_queue(logstash: LineCollector) -> None:
    logs.configure("kit-test", "1.0", "test", logstash_host="127.0.0.1", logstash_port=logstash.server_address[1])
    for number in range(200):
        logging.getLogger("parley.burst").info("line %d", number)
    logs.shutdown()
    assert [doc["message"] for doc in logstash.take(200)] == [f"line {n}" for n in range(200)]


@pytest.fixture
def stalled_logstash() -> Iterator[int]:
    """A port that accepts TCP connections (kernel backlog) but never reads: sends stall once buffers fill."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("where", ["refused", "black-hole", "stalled"])
def test_unreachable_logstash_never_blocks_or_raises(
    where: str, stalled_logstash: int, capfd: pytest.CaptureFixture[str]
) -> None:
    host, port = {
        "refused": ("127.0.0.1", free_port()),
        "black-hole": ("10.255.255.1", 5000),  # unroutable: connects time out (or fail at once without a route)
        "stalled": ("127.0.0.1", stalled_logstash),
    }[where]
    logs.configure("kit-test", "1.0", "test", logstash_host=host, logstash_port=port)
    log = logging.getLogger("parley.unreachable")
    padding = "x" * 2000
    started = time.monotonic()
    for number in range(20_000):  # ~40 MB: more than socket buffers and the queue hold; overflow is dropped
        log.info("line %d %s", number, padding)
    assert time.monotonic() - started < 15.0
    started = time.monotonic()
    logs.shutdown()
    assert time.monotonic() - started < 30.0
    out, err = capfd.readouterr()
    assert "line 19999" in out  # stdout still got everything
    assert "Logging error" not in err and "Traceback" not in err
