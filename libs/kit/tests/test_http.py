"""The outbound client against real local servers: round trips, timeouts, retries and trace headers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from parley_kit import tracing
from parley_kit.errors import GatewayTimeout, ServiceUnavailable, UpstreamError
from parley_kit.http import ServiceClient
from parley_kit.testing import free_port


class EchoServer(ThreadingHTTPServer):
    """Answers every request with JSON describing it (method, path, headers, body)."""

    daemon_threads = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.path == "/not-json":
                    payload, status = b"plain text", 200
                elif self.path == "/empty":
                    payload, status = b"", 204
                elif self.path == "/drop":
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                else:
                    payload = json.dumps(
                        {
                            "method": self.command,
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "json": json.loads(raw) if raw else None,
                        }
                    ).encode()
                    status = 418 if self.path == "/teapot" else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *_args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.server_address[1]}"


class SilentServer:
    """Accepts connections and reads requests but never answers; counts the requests it received."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[str] = []
        self.connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        conn.settimeout(10)
        try:
            while b"\r\n\r\n" not in buffer:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buffer += chunk
        except OSError:
            return
        self.requests.append(buffer.split(b" ", 1)[0].decode())

    def close(self) -> None:
        """Stop accepting and drop every connection."""
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A local JSON echo server."""
    server = EchoServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    """A local server that never answers."""
    server = SilentServer()
    yield server
    server.close()


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll until the predicate holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_json_round_trip(echo: EchoServer) -> None:
    client = ServiceClient(echo.url + "/", name="echo")
    status, body = client.json("POST", "/v1/things?x=1", json={"name": "widget", "n": [1, 2]}, headers={"x-extra": "1"})
    assert status == 200
    assert body["method"] == "POST" and body["path"] == "/v1/things?x=1"
    assert body["json"] == {"name": "widget", "n": [1, 2]}
    assert body["headers"]["content-type"] == "application/json"
    assert body["headers"]["x-extra"] == "1"


def test_status_and_non_json_bodies(echo: EchoServer) -> None:
    client = ServiceClient(echo.url, name="echo")
    assert client.json("GET", "/teapot")[0] == 418
    assert client.json("GET", "/not-json") == (200, None)
    assert client.json("DELETE", "/empty") == (204, None)


def test_connections_are_reused(echo: EchoServer) -> None:
    client = ServiceClient(echo.url, name="echo")
    for _ in range(5):
        assert client.request("GET", "/x").status == 200
    assert client._pool.num_connections == 1


def test_trace_headers_sent_when_a_trace_is_current(echo: EchoServer) -> None:
    client = ServiceClient(echo.url, name="echo")
    _, plain = client.json("GET", "/x")
    assert "traceparent" not in plain["headers"] and "x-request-id" not in plain["headers"]
    context = tracing.start(None, "req-from-client")
    _, traced = client.json("GET", "/x")
    parsed = tracing.parse_traceparent(traced["headers"]["traceparent"])
    assert parsed is not None
    assert parsed[0] == context.trace_id and parsed[1] != context.span_id
    assert traced["headers"]["x-request-id"] == "req-from-client"


def test_closed_port_is_service_unavailable_fast() -> None:
    client = ServiceClient(f"http://127.0.0.1:{free_port()}", name="auth")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        client.json("GET", "/x")
    assert time.monotonic() - started < 2.0
    assert caught.value.status == 503
    assert "auth" in caught.value.detail


def test_closed_port_post_is_service_unavailable_too() -> None:
    with pytest.raises(ServiceUnavailable):
        ServiceClient(f"http://127.0.0.1:{free_port()}", name="llm").json("POST", "/x", json={})


def test_silent_server_is_gateway_timeout_after_the_read_timeout(silent: SilentServer) -> None:
    client = ServiceClient(silent.url, name="llm", read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(GatewayTimeout) as caught:
        client.json("POST", "/v1/chat/completions", json={"model": "m"})
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 3.0
    assert caught.value.status == 504 and "llm" in caught.value.detail


def test_post_is_not_retried_after_a_read_timeout(silent: SilentServer) -> None:
    client = ServiceClient(silent.url, name="llm", read_timeout=0.3)
    with pytest.raises(GatewayTimeout):
        client.request("POST", "/v1/chat/completions", json={"model": "m"})
    assert wait_for(lambda: len(silent.requests) >= 1)
    time.sleep(0.5)  # not synchronisation: a window in which a wrongful retry would show up
    assert silent.requests == ["POST"]


def test_get_is_retried_after_a_read_timeout(silent: SilentServer) -> None:
    client = ServiceClient(silent.url, name="llm", read_timeout=0.2)
    with pytest.raises(GatewayTimeout):
        client.request("GET", "/v1/models")
    assert wait_for(lambda: len(silent.requests) == 3)
    assert silent.requests == ["GET", "GET", "GET"]


def test_per_call_timeout_overrides_the_default(silent: SilentServer) -> None:
    client = ServiceClient(silent.url, name="llm", read_timeout=30)
    started = time.monotonic()
    with pytest.raises(GatewayTimeout):
        client.request("POST", "/x", body=b"{}", timeout=(1.0, 0.2))
    assert time.monotonic() - started < 3.0


def test_connection_dropped_mid_request_is_upstream_error(echo: EchoServer) -> None:
    with pytest.raises(UpstreamError) as caught:
        ServiceClient(echo.url, name="jobs").request("POST", "/drop", json={})
    assert caught.value.status == 502


def test_stream_leaves_the_body_unread(echo: EchoServer) -> None:
    response = ServiceClient(echo.url, name="echo").request("GET", "/x", stream=True)
    assert json.loads(b"".join(response.stream(16)))["path"] == "/x"
    response.release_conn()
