"""`OneSendResponse` (the kit's gunicorn hooks): the same bytes as gunicorn's own response, in fewer sends.

Each case parses a real request with gunicorn's parser from one end of a socket pair, answers it with gunicorn's
`Response` and with ours, and compares what the peer read (the `Date` header aside) and the `sendall` calls made.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from parley_kit.gunicorn_hooks import OneSendResponse

DATE = re.compile(rb"Date: [^\r]*\r\n")


class RecordingSocket:
    """A real socket whose `sendall` calls are kept, to count them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))
        self.sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class Exchange:
    """One request parsed by gunicorn from a socket pair, and the response class that answers it."""

    def __init__(self, response_class: type[wsgi.Response], request: bytes) -> None:
        self.server, self.client = socket.socketpair()
        self.client.sendall(request)
        cfg = Config()
        self.recording = RecordingSocket(self.server)
        parsed = next(RequestParser(cfg, self.server, ("127.0.0.1", 50000)))
        self.response = response_class(parsed, self.recording, cfg)

    def received(self) -> bytes:
        """Everything the peer reads once the server side is done (the `Date` header removed)."""
        self.server.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := self.client.recv(65536):
            data += chunk
        self.server.close()
        self.client.close()
        return DATE.sub(b"", data)


def answer(
    response_class: type[wsgi.Response],
    request: bytes,
    status: str,
    headers: list[tuple[str, str]],
    writes: list[bytes],
) -> tuple[bytes, list[bytes], list[int]]:
    """What the peer read, the sends, and how many sends had been made after each write."""
    exchange = Exchange(response_class, request)
    exchange.response.start_response(status, headers)
    after_each_write = []
    for data in writes:
        exchange.response.write(data)
        after_each_write.append(len(exchange.recording.sends))
    exchange.response.close()
    return exchange.received(), exchange.recording.sends, after_each_write


GET = b"GET /v1/models HTTP/1.1\r\nHost: parley\r\n\r\n"
GET_10 = b"GET /v1/models HTTP/1.0\r\n\r\n"
HEAD = b"HEAD /v1/models HTTP/1.1\r\nHost: parley\r\n\r\n"
OK = '{"ok":true}'
JSON = [("Content-Type", "application/json"), ("Content-Length", str(len(OK)))]
STREAM = [("Content-Type", "text/event-stream")]


@pytest.mark.parametrize(
    ("request_bytes", "status", "headers", "writes", "sends", "saved"),
    [
        pytest.param(GET, "200 OK", JSON, [OK.encode()], [OK.encode()], 1, id="sized answer: one send"),
        pytest.param(GET_10, "200 OK", JSON, [OK.encode()], [OK.encode()], 1, id="HTTP/1.0: one send"),
        pytest.param(
            GET, "200 OK", [("Content-Length", "5")], [b"hello world"], [b"hello"], 1, id="a write past Content-Length"
        ),
        pytest.param(
            GET,
            "200 OK",
            STREAM,
            [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"],
            [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n", b"E\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"],
            1,
            id="stream: the head rides with the first chunk",
        ),
        pytest.param(
            GET,
            "200 OK",
            STREAM,
            [b"", b"data: 1\n\n"],
            [b"", b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"],
            0,
            id="an empty first write sends the head at once",
        ),
        pytest.param(GET, "200 OK", STREAM, [], [b"", b"0\r\n\r\n"], 0, id="a stream closed with no write"),
        pytest.param(GET, "200 OK", [("Content-Length", "0")], [b""], [b""], 0, id="an empty sized answer"),
        pytest.param(GET, "200 OK", [("Content-Length", "0")], [b"late"], [b""], 0, id="bytes past Content-Length 0"),
        pytest.param(HEAD, "200 OK", JSON, [OK.encode()], [b""], 0, id="HEAD: the head alone, at the write"),
        pytest.param(GET, "204 No Content", [], [b"dropped"], [b""], 0, id="204: the head alone, at the write"),
    ],
)
def test_the_same_bytes_as_gunicorns_response_with_the_head_in_the_first_send(
    request_bytes: bytes,
    status: str,
    headers: list[tuple[str, str]],
    writes: list[bytes],
    sends: list[bytes],
    saved: int,
) -> None:
    theirs, their_sends, _ = answer(wsgi.Response, request_bytes, status, headers, writes)
    ours, our_sends, after_each_write = answer(OneSendResponse, request_bytes, status, headers, writes)
    assert ours == theirs
    head = theirs[: theirs.index(b"\r\n\r\n") + 4]
    assert [DATE.sub(b"", send) for send in our_sends] == [head + sends[0], *sends[1:]]
    assert len(their_sends) - len(our_sends) == saved  # gunicorn's own sends the head apart from the first bytes
    # Nothing is held back: every write is on the wire before it returns.
    assert after_each_write == list(range(1, len(writes) + 1))


def test_a_file_answer_is_gunicorns_own(tmp_path: Path) -> None:
    """`wsgi.file_wrapper` answers go through gunicorn's sendfile, head first, as before."""
    path = tmp_path / "answer.json"
    path.write_bytes(OK.encode())
    received = []
    for response_class in (wsgi.Response, OneSendResponse):
        exchange = Exchange(response_class, GET)
        exchange.response.start_response("200 OK", JSON)
        with path.open("rb") as file:
            exchange.response.write_file(wsgi.FileWrapper(file))
        exchange.response.close()
        received.append(exchange.received())
    assert received[0] == received[1]
    assert received[1].endswith(b"\r\n\r\n" + OK.encode())


def test_a_first_write_that_fails_sends_nothing_and_leaves_the_head_unsent() -> None:
    """The app's first item is not bytes: nothing reached the peer, so gunicorn (or the app) may still answer another
    status."""
    exchange = Exchange(OneSendResponse, GET)
    exchange.response.start_response("200 OK", JSON)
    with pytest.raises(TypeError):
        exchange.response.write("not bytes")  # type: ignore[arg-type]
    assert exchange.recording.sends == []
    assert exchange.response.headers_sent is False
    # An app that catches it may start another response (PEP 3333's exc_info): its head, not the first one, is sent.
    exchange.response.start_response("500 Internal Server Error", [("Content-Length", "3")], (None, None, None))
    exchange.response.write(b"err")
    exchange.response.close()
    received = exchange.received()
    assert received.startswith(b"HTTP/1.1 500 Internal Server Error\r\n") and received.endswith(b"\r\n\r\nerr")
