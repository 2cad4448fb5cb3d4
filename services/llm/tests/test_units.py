"""Unit tests: no database; the relayed-stream tests read a real loopback connection."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from parley_kit.forward import ForwardClient, ForwardResponse
from parley_kit.testing import read_http_request
from parley_llm.catalog import CatalogError, load_catalog
from parley_llm.relay import (
    AnthropicStreamMeter,
    CallContext,
    OpenAIStreamMeter,
    RelayedStream,
    estimate_prompt_words,
)
from parley_llm.settings import BUNDLED_MODELS_FILE, LlmSettings
from parley_llm.telemetry import CallRecord
from parley_llm.upstream import Upstreams

OPENAI_A = "models: {a: {provider: openai, upstream_model: a}}\n"


def record() -> CallRecord:
    return CallRecord(operation="chat", provider="openai", request_model="m", upstream_model="m")


def test_bundled_catalogue_has_the_required_models() -> None:
    catalog = load_catalog(BUNDLED_MODELS_FILE)
    assert catalog.price_version
    assert catalog.get("gpt-4o-mini").provider == "openai"
    assert catalog.get("claude-3-5-haiku-latest").provider == "anthropic"
    assert catalog.get("text-embedding-3-small").operation == "embeddings"
    assert str(catalog.get("gpt-4o-mini").cost(1_000_000, 1_000_000)) == "0.75"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "prices: {price_version: v1}\n" + OPENAI_A,
            "every model needs a price",
        ),
        ("prices: {a: {input: 1, output: 1}}\nmodels: {a: {provider: openai, upstream_model: a}}\n", "price_version"),
        (
            "prices: {price_version: v, a: {input: 1, output: 1}}\nmodels: {a: {provider: nope, upstream_model: a}}\n",
            "provider",
        ),
        (
            "prices: {price_version: v, a: {input: -1, output: 1}}\n" + OPENAI_A,
            "greater than or equal",
        ),
        ("models: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_models_file_is_refused_with_a_clear_message(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(content)
    with pytest.raises(CatalogError, match=message):
        load_catalog(path)


def test_missing_models_file() -> None:
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog("/nonexistent/models.yaml")


def test_openai_meter_counts_content_and_drops_unasked_usage() -> None:
    meter = OpenAIStreamMeter(record(), client_wants_usage=False)
    assert meter.handle(b'data: {"model":"x","choices":[{"delta":{"role":"assistant","content":""}}]}')
    assert meter.handle(b'data: {"choices":[{"delta":{"content":"hi"}}]}')
    assert meter.handle(b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}')
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
    assert meter.handle(usage) is None
    assert meter.handle(b"data: [DONE]") == b"data: [DONE]"
    assert meter.chunks == 2 and meter.done and meter.usage_seen
    assert (meter.record.input_tokens, meter.record.output_tokens, meter.record.response_model) == (5, 2, "x")
    keeps = OpenAIStreamMeter(record(), client_wants_usage=True)
    assert keeps.handle(usage) == usage


def test_anthropic_meter_reads_start_and_cumulative_delta() -> None:
    meter = AnthropicStreamMeter(record())
    meter.handle(
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"c","usage":{"input_tokens":9}}}'
    )
    meter.handle(b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"a"}}')
    meter.handle(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}')
    meter.handle(b'event: message_stop\ndata: {"type":"message_stop"}')
    assert (meter.record.input_tokens, meter.record.output_tokens, meter.chunks, meter.done) == (9, 7, 1, True)
    assert meter.error_event("x").startswith(b"event: error\ndata: ")


def test_prompt_words_estimate() -> None:
    body = {
        "system": "be brief",
        "messages": [{"content": "one two three"}, {"content": [{"type": "text", "text": "four five"}]}],
    }
    assert estimate_prompt_words(body) == 7
    assert estimate_prompt_words({"input": ["a b", "c"]}) == 3


def test_redaction_removes_keys_and_urls() -> None:
    upstreams = Upstreams(LlmSettings(openai_api_key="sk-very-secret", openai_base_url="http://10.1.2.3:9/v1"))
    try:
        text = upstreams.redact("Incorrect API key sk-very-secret for http://10.1.2.3:9/v1/chat")
        assert "sk-very-secret" not in text and "10.1.2.3" not in text
    finally:
        upstreams.close()


def test_settings_defaults() -> None:
    settings = LlmSettings()
    assert settings.bind == "127.0.0.1:8082" and settings.worker_class == "gevent"
    assert settings.workers == 2 and settings.worker_connections == 4000
    assert settings.database_url == "sqlite:///.run/llm.db"
    assert (settings.connect_timeout, settings.first_byte_timeout, settings.total_timeout) == (3, 60, 600)
    assert "dev-fake-key" not in repr(settings)


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
STREAM_BODY = b'data: {"choices":[]}\n\ndata: [DONE]\n\n'


def _stream_parts(
    serve: Callable[[Callable[[socket.socket], None]], str], provider_saw_eof: threading.Event
) -> tuple[ForwardResponse, CallContext, OpenAIStreamMeter, list[CallRecord]]:
    """A relayed stream over a real upstream connection, and the settlements it makes. The provider sends its head,
    waits a moment (a stream closed unstarted must close the connection before reading), then the body."""

    def provider(connection: socket.socket) -> None:
        read_http_request(connection)
        connection.sendall(STREAM_HEAD)
        connection.settimeout(0.3)
        try:
            if connection.recv(1) == b"":
                provider_saw_eof.set()
                return
        except TimeoutError:
            pass
        connection.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(STREAM_BODY), STREAM_BODY))

    deployment = load_catalog(BUNDLED_MODELS_FILE).get("gpt-4o-mini")
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "four words of prompt"}]}
    ctx = CallContext(
        request_id="req_1",
        user_id="user_1",
        key_id=None,
        deployment=deployment,
        operation="chat",
        body=body,
        started=0.0,
    )
    upstream = ForwardClient(serve(provider)).request("POST", "/v1/chat/completions", body=b"{}", headers={})
    settled: list[CallRecord] = []
    return upstream, ctx, OpenAIStreamMeter(ctx.new_record(streamed=True), client_wants_usage=False), settled


def test_a_stream_closed_before_its_first_event_still_settles_once(serve) -> None:  # type: ignore[no-untyped-def]
    """A generator closed unstarted skips its `finally`: the relayed stream settles (cancelled) and closes anyway."""
    provider_saw_eof = threading.Event()
    upstream, ctx, meter, settled = _stream_parts(serve, provider_saw_eof)
    stream = RelayedStream(upstream, ctx, meter, lambda _c, record, _t: settled.append(record), total_timeout=5)
    stream.close()
    assert [(r.status, r.input_tokens) for r in settled] == [("cancelled", 4)]
    assert provider_saw_eof.wait(5)


def test_a_relayed_stream_read_to_the_end_settles_once(serve) -> None:  # type: ignore[no-untyped-def]
    """The normal path settles exactly once, from the generator's own `finally`."""
    provider_saw_eof = threading.Event()
    upstream, ctx, meter, settled = _stream_parts(serve, provider_saw_eof)
    stream = RelayedStream(upstream, ctx, meter, lambda _c, record, _t: settled.append(record), total_timeout=5)
    list(stream)
    stream.close()
    assert len(settled) == 1
