"""Fault 3: Redis (our own redis-server, on its own port) stops behind a gateway of our own in front of the real
platform. services/gateway/tests/test_redis_down.py checks the OpenAI route, the gauge and the recovery against a
stand-in upstream; here, with real auth, llm and jobs behind the gateway: both APIs' shapes and streams are refused
before any byte, nothing reaches llm's ledger while refused, routes without limits keep working, /readyz says why,
a stream already admitted finishes, and the time to recover is measured."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import redis
import requests

from parley_kit.processes import free_port
from parley_kit.testing import eventually

from .conftest import (
    assert_anthropic_error,
    assert_openai_error,
    content_deltas,
    figure,
    parse_sse,
    post,
    query,
    redis_down,
    start_own_gateway,
    user_of,
)

if TYPE_CHECKING:
    from tests.integration.conftest import Client, RunningPlatform

OwnRedis = redis_down.OwnRedis
degraded = redis_down.degraded


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    """Our own redis-server for this module (test_redis_down.py's helper), on its own port."""
    server = OwnRedis(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(module_redis: OwnRedis) -> OwnRedis:
    """Our Redis, running at the start of each test (a test before may have left it stopped)."""
    try:
        redis.Redis.from_url(module_redis.url, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        module_redis.start()
    return module_redis


@pytest.fixture(scope="module")
def redis_gateway(
    platform: RunningPlatform, module_redis: OwnRedis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway of our own (the platform's auth, llm, jobs) whose limits live in our Redis; fail closed."""
    process, url = start_own_gateway(
        platform.platform.processes["gateway"].env,
        tmp_path_factory.mktemp("redis-gateway"),
        GATEWAY_REDIS_URL=module_redis.url,
        GATEWAY_REDIS_PREFIX=f"faults-{uuid.uuid4().hex[:6]}:",
        GATEWAY_RATE_LIMIT_FAILURE_MODE="closed",
    )
    yield url
    process.stop(signum=signal.SIGINT)


def ledger_rows(platform: RunningPlatform, client: Client) -> int:
    """How many calls llm booked for the client."""
    rows = query(
        platform.config.database_urls["llm"],
        "SELECT count(*) FROM usage_records WHERE user_id = :user",
        user=user_of(client.access_token),
    )
    return rows[0][0]


def test_redis_down_refuses_limited_routes_in_their_shape_and_serves_the_rest(
    platform: RunningPlatform, own_redis: OwnRedis, redis_gateway: str
) -> None:
    client = platform.new_client()
    key = {"Authorization": f"Bearer {client.api_key}"}
    up = post(redis_gateway, client, "openai", stream=False)
    assert up.status_code == 200 and up.headers["x-ratelimit-remaining-requests"], up.headers
    assert degraded(redis_gateway) == 0.0
    assert eventually(lambda: ledger_rows(platform, client) == 1)  # booked just after the answer went out
    booked = 1

    own_redis.stop()
    refused = {
        "openai": post(redis_gateway, client, "openai", stream=False),
        "openai-stream": post(redis_gateway, client, "openai", stream=True),
        "anthropic": post(redis_gateway, client, "anthropic", stream=False),
        "anthropic-stream": post(redis_gateway, client, "anthropic", stream=True),
        "embeddings": requests.post(
            f"{redis_gateway}/v1/embeddings",
            json={"model": "text-embedding-3-small", "input": "hello"},
            headers=key,
            timeout=30,
        ),
    }
    for name, response in refused.items():
        check = assert_anthropic_error if name.startswith("anthropic") else assert_openai_error
        check(response, 503)  # streams too: refused before any byte, as JSON, not as a broken event stream
        assert response.headers.get("Retry-After") == "1", (name, response.headers)
    assert degraded(redis_gateway) == 1.0
    assert ledger_rows(platform, client) == booked  # nothing refused reached llm

    # Routes without limits do not need Redis: models, batches, logging in.
    assert requests.get(f"{redis_gateway}/v1/models", headers=key, timeout=30).status_code == 200
    assert requests.get(f"{redis_gateway}/v1/batches", headers=key, timeout=30).status_code == 200
    login = requests.post(
        f"{redis_gateway}/auth/token", json={"email": client.email, "password": client.password}, timeout=30
    )
    assert login.status_code == 200, login.text
    assert requests.get(f"{redis_gateway}/livez", timeout=10).status_code == 200
    ready = requests.get(f"{redis_gateway}/readyz", timeout=10)
    assert ready.status_code == 503 and "redis" in ready.text, ready.text

    own_redis.start()
    started = time.monotonic()
    assert eventually(lambda: post(redis_gateway, client, "openai", stream=False).status_code == 200, 15)
    recovered = time.monotonic() - started
    assert eventually(lambda: degraded(redis_gateway) == 0.0, 15)
    back = post(redis_gateway, client, "anthropic", stream=False)
    assert back.status_code == 200 and back.headers["x-ratelimit-remaining-requests"]
    assert requests.get(f"{redis_gateway}/readyz", timeout=10).status_code == 200
    figure(
        "redis-down",
        refused_503=len(refused),
        shapes="openai+anthropic",
        reached_llm=ledger_rows(platform, client) - booked - 2,
        seconds_to_recover=round(recovered, 2),
    )


def test_a_stream_admitted_before_redis_goes_away_finishes(
    platform: RunningPlatform, redis_gateway: str, own_redis: OwnRedis
) -> None:
    """The limit was checked on admission; losing Redis mid-stream costs only the token settlement (logged)."""
    client = platform.new_client()
    response = post(redis_gateway, client, "openai", stream=True, text="long one #fake:chunk_delay_ms=50")
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(line for line in lines if line)
    own_redis.stop()
    rest = b"\n\n".join(line for line in lines if line)
    events = parse_sse(first + b"\n\n" + rest)
    assert content_deltas("openai", events) == 16 and events[-1][1] == "[DONE]", events[-2:]
    assert eventually(lambda: ledger_rows(platform, client) == 1, 10)
    figure("redis-down-mid-stream", deltas=16, completed=True)
