"""Redis goes away under a real gateway process: limited requests get 503 and the degraded gauge says 1; when Redis
comes back, limits are enforced again and the gauge returns to 0. The Redis is this test's own redis-server."""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import urllib3

from parley_kit.testing import ServiceProcess, TokenMint, eventually, free_port, python_module, unavailable

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    """These tests start and stop a redis-server of their own: missing, a skip locally and a failure in CI."""
    if shutil.which("redis-server") is None:
        unavailable("a redis-server of the test's own", "redis-server is not installed")


CHAT = "/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi #fake:tokens=1"}]}'


class OwnRedis:
    """A throwaway redis-server (no persistence) on a fixed port, stoppable and restartable."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until it answers PING."""
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self._workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        """Stop it (SIGTERM, then wait)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A running redis-server of this test's own."""
    server = OwnRedis(free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gateway_on_own_redis(
    own_redis: OwnRedis, fake_provider: str, token_mint: TokenMint, tmp_path: Path
) -> Iterator[str]:
    """A gateway process (two workers) whose limits live in that Redis; failure mode closed (the default)."""
    port = free_port()
    process = ServiceProcess(
        "gateway-redis-down",
        python_module("parley_gateway", "serve"),
        env={
            "PARLEY_ENV": "test",
            "PARLEY_LLM_URL": fake_provider,
            "PARLEY_AUTH_URL": f"http://127.0.0.1:{free_port()}",  # down: this test needs neither
            "PARLEY_JOBS_URL": f"http://127.0.0.1:{free_port()}",
            "PARLEY_JWKS_URL": token_mint.jwks_url,
            "GATEWAY_BIND": f"127.0.0.1:{port}",
            "GATEWAY_WORKERS": "2",
            "GATEWAY_METRICS_DIR": str(tmp_path / "metrics"),
            "GATEWAY_CLIENT_SECRET": secrets.token_urlsafe(24),
            "GATEWAY_REVOCATION_EVENTS": "false",
            "GATEWAY_REDIS_URL": own_redis.url,
            "GATEWAY_REDIS_PREFIX": "down-test:",
        },
        log_dir=tmp_path,
        ready_url=f"http://127.0.0.1:{port}/livez",
    ).start()
    yield f"http://127.0.0.1:{port}"
    process.stop(signum=signal.SIGINT)  # gunicorn's quick shutdown


def degraded(gateway: str) -> float | None:
    """The value of parley_ratelimit_degraded on /metrics (None when not exported yet)."""
    text = urllib3.request("GET", f"{gateway}/metrics", timeout=5).data.decode()
    found = re.search(r"^parley_ratelimit_degraded(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_redis_down_is_503_and_degraded_then_recovers(
    gateway_on_own_redis: str, own_redis: OwnRedis, token_mint: TokenMint
) -> None:
    """Up: 200 with limit headers. Down: 503 in the OpenAI shape, fast, and the gauge at 1. Back: 200, gauge 0."""
    headers = {"Authorization": f"Bearer {token_mint.mint('user-r', key_id='key-r')}"}

    def post() -> urllib3.BaseHTTPResponse:
        return urllib3.request("POST", f"{gateway_on_own_redis}{CHAT}", body=BODY, headers=headers, timeout=10)

    up = post()
    assert up.status == 200
    assert up.headers["x-ratelimit-limit-requests"]

    own_redis.stop()
    started = time.monotonic()
    down = post()
    assert time.monotonic() - started < 2.0
    assert down.status == 503
    assert orjson.loads(down.data)["error"]["type"] == "server_error"
    assert down.headers["Retry-After"] == "1"
    assert degraded(gateway_on_own_redis) == 1.0

    own_redis.start()
    # every worker must see Redis again for the gauge (the max over live workers) to drop
    assert eventually(lambda: post().status == 200 and degraded(gateway_on_own_redis) == 0.0, 15)
