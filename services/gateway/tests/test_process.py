"""A real gateway process (gunicorn + gevent) in front of the fake provider, driven by the official SDKs."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Iterator

import anthropic
import jwt
import openai
import orjson
import pytest
import urllib3

from parley_kit.testing import TokenMint

CHAT = "/v1/chat/completions"


_OPEN_CLIENTS: list[openai.OpenAI] = []


def sdk(gateway: str, token: str) -> openai.OpenAI:
    """The OpenAI SDK pointed at the gateway, retries off so failures show (closed after the test)."""
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=token, max_retries=0, timeout=30)
    _OPEN_CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    """Close each test's SDK clients itself: one left to the garbage collector warns of an unclosed socket, which
    this suite's warnings-as-errors turns into a failure of whichever test happens to be running."""
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


def say(text: str) -> list[dict[str, str]]:
    """A one-message conversation."""
    return [{"role": "user", "content": text}]


def test_completion_through_the_gateway(gateway_process: str, token_mint: TokenMint) -> None:
    """The OpenAI SDK gets a completion with a user JWT as its API key."""
    reply = sdk(gateway_process, token_mint.mint("user-1")).chat.completions.create(
        model="gpt-4o-mini", messages=say("hello")
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_stream_through_the_gateway(gateway_process: str, token_mint: TokenMint) -> None:
    """A streamed completion arrives as chunks and ends with its usage."""
    stream = sdk(gateway_process, token_mint.mint("user-1")).chat.completions.create(
        model="gpt-4o-mini", messages=say("hello #fake:tokens=8"), stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_first_chunk_arrives_while_the_upstream_still_produces(gateway_process: str, token_mint: TokenMint) -> None:
    """No buffering: with 10 deltas 150 ms apart, the first one is here long before the last is produced."""
    started = time.monotonic()
    stream = sdk(gateway_process, token_mint.mint("user-1")).chat.completions.create(
        model="gpt-4o-mini", messages=say("pace #fake:tokens=10 #fake:chunk_delay_ms=150"), stream=True
    )
    arrivals = [time.monotonic() - started for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) == 10
    assert arrivals[-1] >= 1.3  # the upstream took its time ...
    assert arrivals[0] < 0.6  # ... and the first delta did not wait for the rest
    assert arrivals[-1] - arrivals[0] >= 1.2


def test_client_disconnect_reaches_the_upstream_within_a_second(
    gateway_process: str, fake_stats: Callable[[], dict], token_mint: TokenMint
) -> None:
    """Closing a stream mid-way closes the gateway's upstream connection at once (fake stats see the hang-up)."""
    before = fake_stats()["streams_disconnected"]
    stream = sdk(gateway_process, token_mint.mint("user-1")).chat.completions.create(
        model="gpt-4o-mini", messages=say("long #fake:tokens=100 #fake:chunk_delay_ms=200"), stream=True
    )
    for index, _chunk in enumerate(stream):
        if index == 2:
            break
    stream.close()
    closed_at = time.time()
    deadline = time.monotonic() + 5
    stats = fake_stats()
    while stats["streams_disconnected"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = fake_stats()
    assert stats["streams_disconnected"] == before + 1
    assert stats["last_disconnect_at"] - closed_at < 1.0


def test_disconnect_during_a_quiet_upstream_is_seen_at_once(
    gateway_process: str, fake_stats: Callable[[], dict], token_mint: TokenMint
) -> None:
    """The client leaves while the upstream is silent (4 s between deltas): no write fails, yet the upstream hears
    of it within a second (the gateway watches the client socket instead of waiting for the next chunk)."""
    before = fake_stats()["streams_disconnected"]
    stream = sdk(gateway_process, token_mint.mint("user-1")).chat.completions.create(
        model="gpt-4o-mini", messages=say("slow #fake:tokens=5 #fake:chunk_delay_ms=4000"), stream=True
    )
    next(iter(stream))  # the role chunk comes at once; the first delta is 4 s away
    stream.close()
    closed_at = time.time()
    deadline = time.monotonic() + 3
    stats = fake_stats()
    while stats["streams_disconnected"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = fake_stats()
    assert stats["streams_disconnected"] == before + 1
    assert stats["last_disconnect_at"] - closed_at < 1.0


def test_identity_headers_never_reach_the_upstream(
    gateway_process: str, fake_stats: Callable[[], dict], token_mint: TokenMint
) -> None:
    """Client-sent identity headers are stripped; the upstream gets the bearer token and trace headers."""
    token = token_mint.mint("user-1")
    with openai.OpenAI(  # closed here: one left to the garbage collector fails whichever test then runs
        base_url=f"{gateway_process}/v1",
        api_key=token,
        max_retries=0,
        default_headers={"x-user-id": "admin", "x-api-key": "sk-pl-forged", "x-parley-user": "admin"},
    ) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=say("who am i"))
    seen = fake_stats()["last_request_headers"]
    assert not {"x-user-id", "x-api-key", "x-parley-user"} & set(seen)
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["traceparent"].startswith("00-")
    assert seen["x-request-id"]


def test_anthropic_client_with_x_api_key(
    gateway_process: str, fake_stats: Callable[[], dict], token_mint: TokenMint
) -> None:
    """An Anthropic SDK client (credential in x-api-key) gets a message; upstream sees a bearer token instead."""
    token = token_mint.mint("user-2")
    with anthropic.Anthropic(base_url=gateway_process, api_key=token, max_retries=0, timeout=30) as client:
        message = client.messages.create(model="claude-haiku-4-5", max_tokens=32, messages=say("hi"))
    assert message.content[0].text
    seen = fake_stats()["last_request_headers"]
    assert "x-api-key" not in seen
    assert seen["authorization"] == f"Bearer {token}"


@pytest.mark.parametrize(
    "path",
    [
        "/nothing",
        "/v1/unknown",
        "/v1/chat/completionsX",
        "/auth/internal/key-exchange",
        "/auth/service-token",
        "/internal/calls",
    ],
)
def test_unknown_and_hidden_routes_are_404(gateway_process: str, path: str) -> None:
    """Anything the gateway does not route, including auth's and llm's internal endpoints, does not exist at the
    edge."""
    response = urllib3.request("POST", f"{gateway_process}{path}", body=b"{}", timeout=5)
    assert response.status == 404


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\nContent-Length: 2\r\n\r\n",  # folded line
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n 0\r\n\r\n",  # folded length
        b"POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Length: 2\n\n",  # bare LF line ends
        b"POST  /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",  # doubled space
    ],
    ids=["folded-header", "folded-content-length", "bare-lf", "double-space"],
)
def test_malformed_request_heads_are_refused_at_the_door(gateway_process: str, head: bytes) -> None:
    """What a proxy in front could read differently (a request-smuggling lever) gets a 400, never a forwarded request
    (a C parser once tried here let all four through: a folded line became a header with an empty name)."""
    host, port = gateway_process.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        connection.sendall(head + b"{}")
        status_line = connection.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 400"), status_line


def test_body_over_the_limit_is_413_in_openai_shape(gateway_process: str, token_mint: TokenMint) -> None:
    """A body over GATEWAY_MAX_BODY_BYTES (64 KiB here) is refused before it reaches the upstream."""
    response = urllib3.request(
        "POST",
        f"{gateway_process}{CHAT}",
        body=b"x" * (100 * 1024),
        headers={"Authorization": f"Bearer {token_mint.mint('user-1')}", "Content-Type": "application/json"},
        timeout=5,
    )
    assert response.status == 413
    assert orjson.loads(response.data)["error"]["type"] == "invalid_request_error"


def test_upstream_down_is_503_fast(gateway_process: str, token_mint: TokenMint) -> None:
    """jobs is down: /v1/files answers 503 in the OpenAI shape at once, not after a timeout."""
    client = sdk(gateway_process, token_mint.mint("user-1"))
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client.files.list()
    assert time.monotonic() - started < 2.0
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict) and "jobs" in caught.value.body["message"]


def test_bad_tokens_are_401(gateway_process: str, token_mint: TokenMint) -> None:
    """Garbage, expired, unsigned (alg none), wrong audience and unrecognised credentials: 401, OpenAI shape."""
    unsigned = jwt.encode(
        {"sub": "admin", "iss": "parley-auth", "aud": "parley", "typ": "access", "exp": int(time.time()) + 600},
        key=None,
        algorithm="none",
        headers={"kid": token_mint.kid},
    )
    tokens = [
        "a.b.c",
        token_mint.mint("user-1", ttl=-120),
        unsigned,
        token_mint.mint("user-1", aud="somebody-else"),
        "not-a-key",
    ]
    for token in tokens:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(gateway_process, token).models.list()
        assert caught.value.status_code == 401
        assert isinstance(caught.value.body, dict) and caught.value.body.get("message")


def test_metrics_count_overhead_and_auth_failures(gateway_process: str, token_mint: TokenMint) -> None:
    """/metrics exposes the gateway overhead histogram and auth failures by reason."""
    sdk(gateway_process, token_mint.mint("user-1")).models.list()
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway_process, "not-a-key").models.list()
    text = urllib3.request("GET", f"{gateway_process}/metrics", timeout=5).data.decode()
    assert 'parley_gateway_overhead_seconds_count{upstream="llm"}' in text
    refused = re.search(r'^parley_gateway_auth_failures_total\{reason="invalid_credentials"\} (\S+)$', text, re.M)
    assert refused and float(refused.group(1)) >= 1
    # Reasons and decisions that never happened are exported at 0, so the first one shows in rate() and increase().
    assert 'parley_gateway_auth_failures_total{reason="token_revoked"} 0.0' in text
    assert 'parley_ratelimit_decisions_total{decision="limited",kind="tokens"} 0.0' in text
