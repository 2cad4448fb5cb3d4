"""The provider hop against raw sockets of the test's own: the SDK's wire headers on one keep-alive connection, each way
a provider can fail as the error a client sees (and the retry loop reads), and the egress proxy."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from parley_kit.errors import BadRequest, GatewayTimeout, ParleyError, RateLimited, UpstreamError
from parley_kit.testing import CHAT_ANSWER, free_port, modules_loaded, read_http_request, send_json
from parley_llm.catalog import Provider
from parley_llm.routing import retryable
from parley_llm.settings import LlmSettings
from parley_llm.upstream import Upstreams


def upstreams(url: str, **settings: object) -> Upstreams:
    return Upstreams(
        LlmSettings(
            openai_base_url=f"{url}/v1",
            openai_api_key="sk-openai-test",
            anthropic_base_url=url,
            anthropic_api_key="sk-ant-test",
            **settings,
        )
    )


def test_calls_carry_each_sdks_headers_on_one_keep_alive_connection(serve) -> None:  # type: ignore[no-untyped-def]
    connections: list[int] = []
    heads: list[bytes] = []

    def handle(connection: socket.socket) -> None:
        connections.append(1)
        while head := read_http_request(connection):
            heads.append(head.lower())
            send_json(connection)

    hop = upstreams(serve(handle))
    try:
        for _ in range(3):
            assert hop.complete(Provider.OPENAI, "/chat/completions", b"{}") == CHAT_ANSWER
        assert hop.complete(Provider.ANTHROPIC, "/v1/messages", b"{}", headers={"anthropic-beta": "b1"}) == CHAT_ANSWER
    finally:
        hop.close()
    assert len(connections) == 2  # one per provider pool, reused
    openai_head, anthropic_head = heads[0], heads[3]
    assert openai_head.startswith(b"post /v1/chat/completions http/1.1\r\n")
    assert b"authorization: bearer sk-openai-test" in openai_head and b"user-agent: openai/python" in openai_head
    assert anthropic_head.startswith(b"post /v1/messages http/1.1\r\n")
    assert b"anthropic-version: " in anthropic_head and b"anthropic-beta: b1" in anthropic_head
    assert b"sk-ant-test" in anthropic_head
    for head in heads:  # our trace ids stay inside; bytes are passed through, so nothing may come back compressed
        assert b"traceparent" not in head and b"accept-encoding" not in head


def test_the_sdks_headers_are_read_without_loading_the_sdks(tmp_path: Path) -> None:
    """A worker asks the SDKs for their headers in a throwaway interpreter: loading them itself cost ~55 MB of every
    llm worker's memory. The headers are still each SDK's own, with this process's keys (the test above)."""
    env = {"LLM_DATABASE_URL": f"sqlite:///{tmp_path / 'llm.db'}", "PATH": "/usr/bin:/bin"}
    loaded = modules_loaded("import parley_llm; parley_llm.create_app()", ("openai", "anthropic", "httpx"), env)
    assert loaded == []


@pytest.mark.parametrize(
    ("status", "extra", "expected", "code", "retry_after"),
    [
        (b"429 Too Many Requests", b"retry-after: 7\r\n", RateLimited, "rate_limit_exceeded", 7.0),
        (b"500 Internal Server Error", b"", UpstreamError, "upstream_error", None),
        (b"401 Unauthorized", b"", UpstreamError, "upstream_auth", None),
    ],
)
def test_provider_errors_become_client_errors_without_secrets(  # type: ignore[no-untyped-def]
    serve, status: bytes, extra: bytes, expected: type[ParleyError], code: str, retry_after: float | None
) -> None:
    def handle(connection: socket.socket) -> None:
        while read_http_request(connection):
            send_json(connection, b'{"error":{"message":"bad key sk-openai-test"}}', status=status, headers=extra)

    hop = upstreams(serve(handle))
    try:
        with pytest.raises(expected) as caught:
            hop.complete(Provider.OPENAI, "/chat/completions", b"{}")
    finally:
        hop.close()
    error = caught.value
    assert error.code == code and "sk-openai-test" not in str(error)
    assert error.upstream_status == int(status[:3])  # type: ignore[attr-defined]
    assert error.retry_after == retry_after  # type: ignore[attr-defined]


def test_unreachable_silent_and_cut_providers(serve) -> None:  # type: ignore[no-untyped-def]
    refused = upstreams(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(UpstreamError) as caught:
        refused.complete(Provider.OPENAI, "/chat/completions", b"{}")
    assert caught.value.code == "upstream_unreachable"

    def silent(connection: socket.socket) -> None:
        read_http_request(connection)
        time.sleep(2)

    started = time.monotonic()
    with pytest.raises(GatewayTimeout) as timed_out:
        upstreams(serve(silent), total_timeout=0.3).complete(Provider.OPENAI, "/chat/completions", b"{}")
    assert timed_out.value.code == "upstream_timeout" and time.monotonic() - started < 1.5

    def cut(connection: socket.socket) -> None:
        read_http_request(connection)
        connection.sendall(b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"id":')

    with pytest.raises(UpstreamError) as cut_short:
        upstreams(serve(cut)).complete(Provider.OPENAI, "/chat/completions", b"{}")
    assert cut_short.value.code == "upstream_cut"


def test_with_an_egress_proxy_configured_provider_calls_go_through_it(egress_proxy: list[bytes]) -> None:
    """The provider's host does not even resolve: only the proxy can answer."""
    hop = upstreams("http://provider.invalid")
    try:
        assert hop.complete(Provider.OPENAI, "/chat/completions", b"{}") == CHAT_ANSWER
    finally:
        hop.close()
    assert egress_proxy and egress_proxy[0].startswith(b"POST http://provider.invalid:80/v1/chat/completions HTTP/1.1")


def test_a_header_that_cannot_be_sent_is_the_clients_fault_not_a_provider_failure(serve) -> None:  # type: ignore[no-untyped-def]
    """400, and nothing the retry loop or the breaker counts against the provider."""

    def handle(connection: socket.socket) -> None:
        while read_http_request(connection):
            send_json(connection)

    hop = upstreams(serve(handle))
    try:
        with pytest.raises(BadRequest) as caught:
            hop.complete(Provider.ANTHROPIC, "/v1/messages", b"{}", headers={"anthropic-beta": "a\r\nx-injected: 1"})
    finally:
        hop.close()
    assert caught.value.status == 400 and not retryable(caught.value)
