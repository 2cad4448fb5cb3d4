"""The urllib3 transport under the real OpenAI SDK, against raw sockets of the test's own: keep-alive reuse, each way
the wire can fail mapped to the SDK's own exceptions, and a stream read as it arrives."""

from __future__ import annotations

import socket
import threading
import time

import httpx2
import openai
import pytest

from parley_kit.testing import free_port
from parley_kit.testing import read_http_request as read_request
from parley_llm.catalog import Provider
from parley_llm.settings import LlmSettings
from parley_llm.transport import Urllib3Transport
from parley_llm.upstream import Upstreams

FIRST, SECOND = b"data: first\n\n", b"data: second\n\n"
ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'


def sdk(url: str, *, read: float = 5.0) -> openai.OpenAI:
    timeout = httpx2.Timeout(connect=2.0, read=read, write=2.0, pool=2.0)
    transport = Urllib3Transport(max_connections=4)
    return openai.OpenAI(
        api_key="sk-test",
        base_url=f"{url}/v1",
        max_retries=0,
        timeout=timeout,
        http_client=openai.DefaultHttpxClient(transport=transport, timeout=timeout),
    )


def post(client: openai.OpenAI, *, stream: bool = False) -> httpx2.Response:
    return client.post("/chat/completions", cast_to=httpx2.Response, content=b"{}", stream=stream, options={})


def test_answers_reuse_one_keep_alive_connection_and_carry_the_sdk_headers(serve) -> None:  # type: ignore[no-untyped-def]
    connections: list[int] = []
    heads: list[bytes] = []

    def handle(connection: socket.socket) -> None:
        connections.append(1)
        while head := read_request(connection):
            heads.append(head)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(ANSWER), ANSWER)
            )

    client = sdk(serve(handle))
    for _ in range(5):
        response = post(client)
        assert response.status_code == 200
        assert response.read() == ANSWER
    assert len(connections) == 1
    assert heads[0].startswith(b"POST /v1/chat/completions HTTP/1.1")
    assert b"authorization: bearer sk-test" in heads[0].lower()
    assert b"x-stainless-lang" in heads[0].lower()


def test_a_stream_is_read_chunk_by_chunk_as_it_arrives(serve) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()

    def handle(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        connection.sendall(b"%x\r\n%s\r\n" % (len(FIRST), FIRST))
        release.wait(10)  # the second event is only sent once the client has seen the first
        connection.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(SECOND), SECOND))

    response = post(sdk(serve(handle)), stream=True)
    chunks = response.iter_bytes()
    assert next(chunks) == FIRST
    release.set()
    assert b"".join(chunks) == SECOND


def test_a_refused_connection_is_an_api_connection_error() -> None:
    with pytest.raises(openai.APIConnectionError) as caught:
        post(sdk(f"http://127.0.0.1:{free_port()}"))
    assert not isinstance(caught.value, openai.APITimeoutError)


def test_no_answer_within_the_read_timeout_is_an_api_timeout_error(serve) -> None:  # type: ignore[no-untyped-def]
    def handle(connection: socket.socket) -> None:
        read_request(connection)
        time.sleep(2)

    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        post(sdk(serve(handle), read=0.3))
    assert time.monotonic() - started < 1.5


def test_an_answer_cut_mid_body_is_an_error_not_a_short_body(serve) -> None:  # type: ignore[no-untyped-def]
    def handle(connection: socket.socket) -> None:
        read_request(connection)
        connection.sendall(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id":')

    response = post(sdk(serve(handle)), stream=True)
    with pytest.raises(httpx2.TransportError):
        response.read()


def test_with_an_egress_proxy_configured_provider_calls_go_through_it(serve, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """httpx honours HTTP_PROXY only with its own transport, so Upstreams keeps it where a proxy is set: the call
    reaches the proxy (the provider's host does not even resolve)."""
    seen: list[bytes] = []

    def proxy(connection: socket.socket) -> None:
        seen.append(read_request(connection))
        connection.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
        )

    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", serve(proxy))
    upstreams = Upstreams(LlmSettings(openai_base_url="http://provider.invalid/v1", openai_api_key="sk-test"))
    try:
        answer = upstreams.post(Provider.OPENAI, "/chat/completions", b"{}", stream=False)
        assert answer.content == ANSWER
    finally:
        upstreams.close()
    assert seen and seen[0].startswith(b"POST http://provider.invalid/v1/chat/completions HTTP/1.1")
