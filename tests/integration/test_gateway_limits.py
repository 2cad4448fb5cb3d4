"""Issue #5 through real processes: identity at the edge, rate limits shared across gateways, /docs and /readyz.

The shared platform's gateway is used as is; where a test needs other limits it starts its own two gateway processes
(free ports, their own Redis key prefix) in front of the shared platform's auth, llm and jobs.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import openai
import pytest
import requests

from parley_kit.processes import ServiceProcess, free_port, python_module
from parley_kit.testing import eventually

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi #fake:tokens=2"}]}


def user_id(client: Client) -> str:
    """The user id auth gave this client (the `sub` of its access token)."""
    return jwt.decode(client.access_token, options={"verify_signature": False})["sub"]


def requests_counted(platform: RunningPlatform, client: Client) -> int:
    """How many requests llm's ledger holds for this client's user (`GET /v1/usage`)."""
    response = requests.get(
        f"{platform.gateway}/v1/usage", headers={"Authorization": f"Bearer {client.api_key}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return sum(row["requests"] for row in response.json()["data"])


def test_identity_headers_never_change_who_the_request_acts_as(platform: RunningPlatform) -> None:
    """User B's request carrying user A's id in every identity header the services might read acts as B:
    the ledger books it to B and A's usage stays empty."""
    alice, bob = platform.new_client(), platform.new_client()
    alice_id = user_id(alice)
    forged = {
        "x-user-id": alice_id,
        "x-parley-user-id": alice_id,
        "x-parley-key-id": alice.key_id,
        "x-forwarded-user": alice_id,
        "x-remote-user": alice_id,
        "x-act-as": alice_id,
        "x-roles": "admin",
    }
    sdk = openai.OpenAI(
        base_url=f"{platform.gateway}/v1", api_key=bob.api_key, max_retries=0, timeout=30, default_headers=forged
    )
    completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "who am i"}])
    assert completion.choices[0].message.content
    assert eventually(lambda: requests_counted(platform, bob) == 1)  # booked just after the answer went out
    assert requests_counted(platform, alice) == 0


@pytest.fixture
def two_gateways(platform: RunningPlatform, tmp_path: Path) -> Iterator[list[str]]:
    """Two more gateway processes sharing one Redis prefix, 20 requests per minute per key, in front of the shared
    platform's auth, llm and jobs."""
    base_env = platform.platform.processes["gateway"].env
    prefix = f"{platform.config.redis_prefix}limits-{uuid.uuid4().hex[:8]}:"
    processes, urls = [], []
    for index in range(2):
        port = free_port()
        env = {
            **base_env,
            "GATEWAY_BIND": f"127.0.0.1:{port}",
            "GATEWAY_WORKERS": "2",
            "GATEWAY_METRICS_DIR": str(tmp_path / f"metrics-{index}"),
            "GATEWAY_REDIS_PREFIX": prefix,
            "GATEWAY_RATE_LIMIT_KEY_RPM": "20",
            "GATEWAY_ACCESS_LOG": "false",
        }
        processes.append(
            ServiceProcess(
                f"gateway-limits-{index}",
                python_module("parley_gateway", "serve"),
                env=env,
                log_dir=tmp_path,
                ready_url=f"http://127.0.0.1:{port}/readyz",
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for process in processes:
            process.launch()
        for process in processes:
            process.wait_ready(60)
        yield urls
    finally:
        for process in processes:
            process.stop(signum=2)  # SIGINT: gunicorn's quick shutdown


def test_two_gateways_admit_exactly_the_limit(platform: RunningPlatform, two_gateways: list[str]) -> None:
    """100 concurrent requests with one API key, split over two gateway processes sharing Redis, against a limit of
    20 per minute: exactly 20 are admitted, the other 80 get 429 with Retry-After in the OpenAI shape."""
    client = platform.new_client()
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=100))

    def call(index: int) -> requests.Response:
        return session.post(
            f"{two_gateways[index % 2]}{CHAT}",
            json=BODY,
            headers={"Authorization": f"Bearer {client.api_key}"},
            timeout=60,
        )

    with ThreadPoolExecutor(max_workers=100) as pool:
        responses = list(pool.map(call, range(100)))
    statuses = Counter(response.status_code for response in responses)
    assert statuses == {200: 20, 429: 80}, statuses
    # both processes answered and both refused: they counted against one shared window, not 20 each
    refused_by = {response.url.removesuffix(CHAT) for response in responses if response.status_code == 429}
    assert refused_by == set(two_gateways)
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "20"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert eventually(lambda: requests_counted(platform, client) >= 20)
    assert requests_counted(platform, client) == 20  # the refused ones never reached llm
    metrics = session.get(f"{two_gateways[0]}/metrics", timeout=10).text
    assert 'parley_ratelimit_decisions_total{decision="limited",kind="requests"}' in metrics


def test_limit_headers_on_the_shared_gateway(platform: RunningPlatform, client: Client) -> None:
    """The platform's gateway limits by its defaults and says so in OpenAI's headers."""
    response = requests.post(
        f"{platform.gateway}{CHAT}", json=BODY, headers={"Authorization": f"Bearer {client.api_key}"}, timeout=30
    )
    assert response.status_code == 200
    assert (
        int(response.headers["x-ratelimit-remaining-requests"])
        == int(response.headers["x-ratelimit-limit-requests"]) - 1
    )
    assert int(response.headers["x-ratelimit-limit-tokens"]) > 0


def test_docs_show_every_services_openapi(platform: RunningPlatform) -> None:
    """/docs is Swagger UI with a selector; each entry is that service's own OpenAPI document, fetched through the
    gateway."""
    page = requests.get(f"{platform.gateway}/docs", timeout=10)
    assert page.status_code == 200
    assert "SwaggerUIBundle" in page.text
    for service, path in (("auth", "/auth/token"), ("llm", "/v1/chat/completions"), ("jobs", "/v1/batches")):
        assert f"/docs/{service}.json" in page.text
        document = requests.get(f"{platform.gateway}/docs/{service}.json", timeout=10)
        assert document.status_code == 200
        assert path in document.json()["paths"], (service, sorted(document.json()["paths"]))


def test_readyz_aggregates_the_services_and_redis(platform: RunningPlatform) -> None:
    """The gateway is ready when auth, llm, jobs and Redis all answer."""
    ready = requests.get(f"{platform.gateway}/readyz", timeout=10)
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"auth": "ok", "llm": "ok", "jobs": "ok", "redis": "ok"}
