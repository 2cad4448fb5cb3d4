"""The hop client (geventhttpclient) against raw sockets of the test's own: keep-alive reuse, a body read as it
arrives, each way the wire can fail as the exception callers map, and the egress proxy (used only when asked)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from gevent import get_hub

from parley_kit.forward import BodyCut, ForwardClient, HopError, Unreachable
from parley_kit.testing import CHAT_ANSWER, free_port, read_http_request, send_json

FIRST, SECOND = b"data: first\n\n", b"data: second\n\n"


def test_answers_reuse_one_keep_alive_connection(serve) -> None:  # type: ignore[no-untyped-def]
    connections: list[int] = []
    heads: list[bytes] = []

    def handle(connection: socket.socket) -> None:
        connections.append(1)
        while head := read_http_request(connection):
            heads.append(head)
            send_json(connection)

    client = ForwardClient(serve(handle))
    for _ in range(3):
        response = client.request("POST", "/v1/chat/completions", body=b"{}", headers={"x-test": "1"})
        assert (response.status, response.header("content-type")) == (200, "application/json")
        assert response.read_all() == CHAT_ANSWER
        response.close()
    assert len(connections) == 1
    assert heads[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"x-test: 1" in heads[0].lower()


def test_an_ip_literal_is_connected_to_without_asking_the_resolver(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """gevent's resolver hands every lookup to a thread, which waits for the GIL behind a busy hub: an IP literal (every
    hop inside the platform here) needs no lookup at all; a host name still gets one."""
    hub = get_hub()
    asked: list[str] = []

    class Recording:  # the hub's own resolver, noting each host it is asked about
        def __init__(self, real: Any) -> None:
            self.real = real

        def getaddrinfo(self, host: str, *args: Any, **kwargs: Any) -> Any:
            asked.append(host)
            return self.real.getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(hub, "resolver", Recording(hub.resolver))

    def handle(connection: socket.socket) -> None:
        while read_http_request(connection):
            send_json(connection)

    url = serve(handle)
    assert url.startswith("http://127.0.0.1:")
    for base in (url, url.replace("127.0.0.1", "localhost")):
        response = ForwardClient(base).request("GET", "/", body=None, headers={})
        assert (response.status, response.read_all()) == (200, CHAT_ANSWER)
        response.close()
    assert asked == ["localhost"]


def test_a_stream_is_read_as_it_arrives(serve) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def handle(connection: socket.socket) -> None:
        read_http_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        connection.sendall(b"%x\r\n%s\r\n" % (len(FIRST), FIRST))
        release.wait(10)  # the second event is only sent once the client has seen the first
        connection.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(SECOND), SECOND))

    response = ForwardClient(serve(handle)).request("POST", "/v1/chat/completions", body=b"{}", headers={})
    chunks = response.chunks()
    assert next(chunks) == FIRST
    release.set()
    assert b"".join(chunks) == SECOND


def test_an_answer_cut_mid_body_is_an_error_not_a_short_body(serve) -> None:  # type: ignore[no-untyped-def]
    def handle(connection: socket.socket) -> None:
        read_http_request(connection)
        connection.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id":')

    response = ForwardClient(serve(handle)).request("POST", "/v1/chat/completions", body=b"{}", headers={})
    with pytest.raises(BodyCut):
        response.read_all()


def test_a_refused_connection_is_unreachable_after_the_retries() -> None:
    with pytest.raises(Unreachable):
        ForwardClient(f"http://127.0.0.1:{free_port()}").request("GET", "/x", body=None, headers={})


def test_no_answer_within_the_read_timeout_is_a_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    def handle(connection: socket.socket) -> None:
        read_http_request(connection)
        time.sleep(2)

    client = ForwardClient(serve(handle), read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.request("POST", "/v1/chat/completions", body=b"{}", headers={})
    assert time.monotonic() - started < 1.5


def test_a_connection_closed_without_an_answer_is_a_cut(serve) -> None:  # type: ignore[no-untyped-def]
    def handle(connection: socket.socket) -> None:
        read_http_request(connection)  # and close: no status line at all

    with pytest.raises(BodyCut):
        ForwardClient(serve(handle)).request("POST", "/v1/chat/completions", body=b"{}", headers={})


def test_an_abort_cuts_the_connection_so_the_service_sees_it_at_once(serve) -> None:  # type: ignore[no-untyped-def]
    """What the relay does when the client hangs up mid-stream: the service's next read sees EOF."""
    saw_eof = threading.Event()

    def handle(connection: socket.socket) -> None:
        read_http_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        connection.settimeout(5)
        if connection.recv(1) == b"":
            saw_eof.set()

    response = ForwardClient(serve(handle)).request("POST", "/v1/chat/completions", body=b"{}", headers={})
    response.abort()
    response.close()
    assert saw_eof.wait(5)


def test_a_base_url_path_is_a_prefix_and_https_is_accepted() -> None:
    assert ForwardClient("http://127.0.0.1:9/v1/").path_prefix == "/v1"
    assert ForwardClient("https://api.example.com").path_prefix == ""
    with pytest.raises(ValueError):
        ForwardClient("ftp://example.com")


def test_egress_calls_go_through_the_environments_proxy_and_internal_hops_never_do(egress_proxy: list[bytes]) -> None:
    """The provider's host does not even resolve: only the proxy can answer. The same URL without `egress` fails."""
    client = ForwardClient("http://provider.invalid/v1", egress=True, trace=False)
    response = client.request("POST", "/v1/chat/completions", body=b"{}", headers={})
    assert (response.status, response.read_all()) == (200, CHAT_ANSWER)
    assert egress_proxy[0].startswith(b"POST http://provider.invalid:80/v1/chat/completions HTTP/1.1\r\n")
    assert b"traceparent" not in egress_proxy[0].lower()
    with pytest.raises(HopError):
        ForwardClient("http://provider.invalid/v1").request("POST", "/v1/chat/completions", body=b"{}", headers={})
