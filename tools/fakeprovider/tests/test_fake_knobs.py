"""Knobs (errors, pacing, cuts, hangs, garbage), authentication, control endpoints and stats."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
import openai
import pytest
import requests

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from conftest import FakeServer


def _user(text: str) -> list[Any]:
    """A one-message conversation."""
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, openai.BadRequestError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
        (529, openai.InternalServerError),
    ],
)
def test_openai_error_knob(oai: openai.OpenAI, status: int, error_class: type[openai.APIStatusError]) -> None:
    with pytest.raises(error_class) as caught:
        oai.chat.completions.create(model="m", messages=_user(f"hi #fake:error={status}"))
    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and set(caught.value.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.APIStatusError, "overloaded_error"),
    ],
)
def test_anthropic_error_knob(
    claude: anthropic.Anthropic, status: int, error_class: type[anthropic.APIStatusError], error_type: str
) -> None:
    with pytest.raises(error_class) as caught:
        claude.messages.create(model="m", max_tokens=10, messages=_user(f"hi #fake:error={status}"), stream=True)
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type


def test_retry_after_and_header_knobs(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="m", messages=_user("x #fake:error=429 #fake:retry_after=7"))
    assert caught.value.response.headers["retry-after"] == "7"
    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(
            model="m",
            max_tokens=5,
            messages=_user("x"),
            extra_headers={"x-fake-error": "429", "x-fake-retry-after": "3"},
        )
    assert limited.value.response.headers["retry-after"] == "3"


def test_global_config_fails_every_call(fake: FakeServer, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    assert fake.configure(error=500)["knobs"]["error"] == 500
    with pytest.raises(openai.InternalServerError):
        oai.chat.completions.create(model="m", messages=_user("x"))
    with pytest.raises(openai.InternalServerError):
        oai.embeddings.create(model="e", input="x")
    with pytest.raises(openai.InternalServerError):
        oai.models.list()
    with pytest.raises(anthropic.InternalServerError):
        claude.messages.create(model="m", max_tokens=5, messages=_user("x"))
    assert fake.configure()["knobs"]["error"] is None
    assert oai.chat.completions.create(model="m", messages=_user("x")).choices[0].message.content
    bad = fake.http.post(f"{fake.url}/_fake/config", json={"nope": 1}, timeout=5)
    assert bad.status_code == 400


def test_latency_and_chunk_delay(oai: openai.OpenAI) -> None:
    started = time.monotonic()
    oai.chat.completions.create(model="m", messages=_user("x #fake:latency_ms=300"))
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    stream = oai.chat.completions.create(
        model="m", messages=_user("x"), stream=True, extra_headers={"x-fake-chunk-delay-ms": "50", "x-fake-tokens": "4"}
    )
    assert sum(1 for c in stream if c.choices and c.choices[0].delta.content) == 4
    assert time.monotonic() - started >= 0.2


def test_hang_until_client_gives_up(fake: FakeServer, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APITimeoutError):
        oai.with_options(timeout=0.5).chat.completions.create(model="m", messages=_user("x #fake:hang"))
    stats = fake.wait_for(lambda s: s["requests_abandoned"] == 1)
    assert stats["last_disconnect_at"] is not None


def test_cut_without_stream_drops_connection(fake: FakeServer, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=_user("x #fake:cut_after=2"))
    assert fake.stats()["connections_dropped"] == 1


def _openai_contents(stream: Iterator[Any], seen: list[str]) -> None:
    """Collect streamed content into `seen` (so it survives the exception the stream raises)."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen.append(chunk.choices[0].delta.content)


def test_cut_stream(fake: FakeServer, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    seen: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        _openai_contents(
            oai.chat.completions.create(model="m", messages=_user("x #fake:cut_after=3"), stream=True), seen
        )
    assert seen == ["Parley", " fake", " reply"]
    texts: list[str] = []
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)),
        claude.messages.stream(model="m", max_tokens=50, messages=_user("x #fake:cut_after=2")) as stream,
    ):
        texts.extend(stream.text_stream)
    assert texts == ["Parley", " fake"]
    body = {"model": "m", "stream": True, "messages": _user("x #fake:cut_after=1")}
    with (
        fake.http.post(f"{fake.url}/v1/chat/completions", json=body, stream=True, timeout=5) as response,
        pytest.raises(requests.exceptions.ChunkedEncodingError),
    ):
        b"".join(response.iter_content(None))
    assert fake.wait_for(lambda s: s["streams_cut"] == 3)["streams_completed"] == 0


def test_mid_stream_error(fake: FakeServer, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        _openai_contents(
            oai.chat.completions.create(model="m", messages=_user("x #fake:stream_error_after=3"), stream=True), seen
        )
    assert len(seen) == 3 and isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"
    with (
        pytest.raises(anthropic.APIStatusError) as failed,
        claude.messages.stream(model="m", max_tokens=50, messages=_user("x #fake:stream_error_after=2")) as stream,
    ):
        list(stream.text_stream)
    assert failed.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    body = {"model": "m", "stream": True, "messages": _user("x"), "max_tokens": 20}
    with fake.http.post(
        f"{fake.url}/v1/chat/completions", json=body, headers={"x-fake-stream-error-after": "1"}, stream=True
    ) as response:
        frames = response.raw.read().split(b"\n\n")
    assert b"[DONE]" not in b"".join(frames) and frames[-1] == b""
    assert json.loads(frames[-2].removeprefix(b"data: "))["error"]["type"] == "server_error"
    body = {"model": "m", "stream": True, "messages": _user("x #fake:stream_error_after=0"), "max_tokens": 20}
    with fake.http.post(f"{fake.url}/v1/messages", json=body, stream=True) as response:
        last = response.raw.read().split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ") and b'"overloaded_error"' in last
    assert fake.stats()["streams_errored"] == 4


def test_garbage(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    with pytest.raises(ValueError):
        oai.chat.completions.create(model="m", messages=_user("x #fake:garbage"))
    with pytest.raises(ValueError):
        list(oai.chat.completions.create(model="m", messages=_user("x #fake:garbage"), stream=True))
    with pytest.raises(ValueError):
        claude.messages.create(model="m", max_tokens=5, messages=_user("x #fake:garbage"))
    with pytest.raises(ValueError):
        list(claude.messages.create(model="m", max_tokens=5, messages=_user("x #fake:garbage"), stream=True))


def test_disconnect_is_counted(fake: FakeServer, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    paced = {"x-fake-chunk-delay-ms": "200", "x-fake-tokens": "50"}
    stream = oai.chat.completions.create(model="m", messages=_user("x"), stream=True, extra_headers=paced)
    with stream:
        assert next(stream).choices[0].delta.role == "assistant"
        next(stream)
        closed_at = time.time()
    stats = fake.wait_for(lambda s: s["streams_disconnected"] == 1)
    assert closed_at - 0.1 <= stats["last_disconnect_at"] <= closed_at + 1.0  # noticed while pacing, not later
    with claude.messages.stream(model="m", max_tokens=100, messages=_user("x"), extra_headers=paced) as events:
        next(iter(events.text_stream))
    stats = fake.wait_for(lambda s: s["streams_disconnected"] == 2)
    assert stats["streams_started"] == 2 and stats["streams_completed"] == 0


def test_stats_and_last_headers(fake: FakeServer, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    oai.chat.completions.create(model="m", messages=_user("x"))
    list(oai.chat.completions.create(model="m", messages=_user("x"), stream=True))
    assert fake.stats()["last_request_headers"]["authorization"] == f"Bearer {oai.api_key}"
    claude.messages.create(model="m", max_tokens=5, messages=_user("x"), extra_headers={"x-trace": "t1"})
    seen = fake.stats()["last_request_headers"]
    # This anthropic SDK sends its key as a Bearer token; x-api-key is covered with raw requests below.
    assert seen["authorization"] == f"Bearer {claude.api_key}" and seen["x-trace"] == "t1"
    assert "anthropic-version" in seen
    with pytest.raises(anthropic.NotFoundError):
        claude.get("/v1/nope", cast_to=object)
    stats = fake.stats()
    assert stats["requests"] == {"POST /v1/chat/completions": 2, "POST /v1/messages": 1, "unknown": 1}
    assert stats["responses"] == {"200": 3, "404": 1}
    assert stats["streams_started"] == stats["streams_completed"] == 1
    assert fake.http.post(f"{fake.url}/_fake/stats/reset", timeout=5).json()["requests"] == {}


def test_api_key_via_control_endpoint(fake: FakeServer, oai: openai.OpenAI) -> None:
    assert fake.configure(api_key="another-key")["api_key_required"] is True
    with pytest.raises(openai.AuthenticationError):
        oai.models.list()
    fake.configure()
    assert oai.models.list().data


def test_required_key_from_environment(serve: Callable[..., AbstractContextManager[FakeServer]]) -> None:
    with (
        serve({"FAKE_PROVIDER_API_KEY": "right", "FAKE_PROVIDER_TOKENS": "5"}) as keyed,
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0) as wrong,
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="right", max_retries=0) as right,
        anthropic.Anthropic(base_url=keyed.url, api_key="wrong", max_retries=0) as wrong_claude,
    ):
        with pytest.raises(openai.AuthenticationError) as caught:
            wrong.chat.completions.create(model="m", messages=_user("x"))
        assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "invalid_api_key"
        answer = right.chat.completions.create(model="m", messages=_user("x"))
        assert answer.usage and answer.usage.completion_tokens == 5  # FAKE_PROVIDER_TOKENS default
        with pytest.raises(anthropic.AuthenticationError):
            wrong_claude.messages.create(model="m", max_tokens=5, messages=_user("x"))
        missing = keyed.http.post(f"{keyed.url}/v1/chat/completions", json={}, timeout=5)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
        bearer = keyed.http.post(
            f"{keyed.url}/v1/messages",
            json={"model": "m", "max_tokens": 5, "messages": _user("x")},
            headers={"authorization": "Bearer right"},
            timeout=5,
        )
        assert bearer.status_code == 200 and bearer.json()["usage"]["output_tokens"] == 5
        for key, status in (("right", 200), ("wrong", 401)):
            answer = keyed.http.post(
                f"{keyed.url}/v1/messages",
                json={"model": "m", "max_tokens": 5, "messages": _user("x")},
                headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                timeout=5,
            )
            assert answer.status_code == status
        assert answer.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
        assert keyed.stats()["last_request_headers"]["x-api-key"] == "wrong"


def test_many_concurrent_paced_streams(fake: FakeServer) -> None:
    body = {"model": "m", "stream": True, "messages": _user("x #fake:tokens=5 #fake:chunk_delay_ms=100")}

    def one(_: int) -> bytes:
        with requests.post(f"{fake.url}/v1/chat/completions", json=body, stream=True, timeout=30) as response:
            return response.raw.read()

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=100) as pool:
        bodies = list(pool.map(one, range(100)))
    # Each stream takes 0.5 s; served one at a time they would take 50 s.
    assert time.monotonic() - started < 10
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
    assert fake.stats()["streams_completed"] == 100
