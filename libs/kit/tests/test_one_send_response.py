"""`OneSendResponse` (the kit's gunicorn hooks): the same bytes as gunicorn's own response, in fewer sends.

Each case parses a real request with gunicorn's parser from one end of a socket pair, answers it with gunicorn's
`Response` and with ours, and compares what the peer reads (the `Date` header aside) and the `sendall` calls made.
"""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from parley_kit.gunicorn_hooks import OneSendResponse


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


def answer(
    response_class: type[wsgi.Response], request: bytes, headers: list[tuple[str, str]], writes: list[bytes]
) -> tuple[bytes, list[bytes]]:
    """Answer `request` with `headers` and `writes` through `response_class`; what the peer read, and the sends."""
    server, client = socket.socketpair()
    with server, client:
        client.sendall(request)
        cfg = Config()
        parsed = next(RequestParser(cfg, server, ("127.0.0.1", 50000)))
        recording = RecordingSocket(server)
        response = response_class(parsed, recording, cfg)
        response.start_response("200 OK", headers)
        for data in writes:
            response.write(data)
        response.close()
        server.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    return re.sub(rb"Date: [^\r]*\r\n", b"", received), recording.sends


GET = b"GET /v1/models HTTP/1.1\r\nHost: parley\r\n\r\n"
HEAD = b"HEAD /v1/models HTTP/1.1\r\nHost: parley\r\n\r\n"
JSON = [("Content-Type", "application/json"), ("Content-Length", "11")]
STREAM = [("Content-Type", "text/event-stream")]


@pytest.mark.parametrize(
    ("request_bytes", "headers", "writes", "sends", "saved"),
    [
        pytest.param(GET, JSON, [b'{"ok":true}'], [b'{"ok":true}'], 1, id="sized answer: one send"),
        pytest.param(GET, [("Content-Length", "0")], [b""], [b""], 0, id="empty sized answer: one send, as before"),
        pytest.param(
            GET,
            STREAM,
            [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"],
            [b"9\r\ndata: 1\n\n\r\n", b"9\r\ndata: 2\n\n\r\n", b"E\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"],
            1,
            id="stream: the head rides with the first chunk, each chunk leaves at once",
        ),
        pytest.param(
            GET,
            STREAM,
            [b"", b"data: 1\n\n"],
            [b"", b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"],
            0,
            id="an empty first write sends the head at once",
        ),
        pytest.param(HEAD, JSON, [b'{"ok":true}'], [b""], 0, id="HEAD: the head alone, at close"),
    ],
)
def test_the_same_bytes_as_gunicorns_response_with_the_head_in_the_first_send(
    request_bytes: bytes, headers: list[tuple[str, str]], writes: list[bytes], sends: list[bytes], saved: int
) -> None:
    theirs, their_sends = answer(wsgi.Response, request_bytes, headers, writes)
    ours, our_sends = answer(OneSendResponse, request_bytes, headers, writes)
    assert ours == theirs
    head = theirs[: theirs.index(b"\r\n\r\n") + 4]
    assert [re.sub(rb"Date: [^\r]*\r\n", b"", send) for send in our_sends] == [head + sends[0], *sends[1:]]
    assert len(their_sends) - len(our_sends) == saved  # gunicorn's own sends the head apart from the first bytes
