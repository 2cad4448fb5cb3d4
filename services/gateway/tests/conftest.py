"""Fixtures: the fake provider as the llm upstream, a stand-in JWKS (token_mint), the app and a real gateway."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import urllib3
from flask.testing import FlaskClient

from parley_gateway import GatewaySettings, create_app
from parley_kit.testing import DEFAULT_AMQP, ServiceProcess, TokenMint, free_port, python_module


def dead_url() -> str:
    """A URL where nothing listens (an upstream that is down)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="session")
def fake_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake OpenAI/Anthropic upstream standing in for the llm service (one worker: one set of stats)."""
    port = free_port()
    process = ServiceProcess(
        "fakeprovider",
        python_module("parley_fakeprovider", "--port", str(port)),
        env={},
        log_dir=tmp_path_factory.mktemp("fakeprovider"),
        ready_url=f"http://127.0.0.1:{port}/healthz",
    ).start()
    yield f"http://127.0.0.1:{port}"
    quick_stop(process)


def quick_stop(process: ServiceProcess) -> None:
    """SIGINT: gunicorn's quick shutdown (a graceful one waits out idle keep-alive connections of the test clients)."""
    process.signal(signal.SIGINT)
    process.stop()


@pytest.fixture
def settings(fake_provider: str, token_mint: TokenMint) -> GatewaySettings:
    """In-process settings: llm is the fake provider, auth is down, jobs is down, no broker listener; development
    (whatever PARLEY_ENV says), so limits are per process unless a test gives them Redis."""
    return GatewaySettings(
        environment="development",
        llm_url=fake_provider,
        auth_url=dead_url(),
        jobs_url=dead_url(),
        jwks_url=token_mint.jwks_url,
        revocation_events=False,
    )


@pytest.fixture
def client(settings: GatewaySettings) -> Iterator[FlaskClient]:
    """A Flask test client on a fresh gateway app."""
    app = create_app(settings)
    yield app.test_client()
    app.extensions["parley_gateway"].close()


@pytest.fixture
def bearer(token_mint: TokenMint) -> dict[str, str]:
    """Headers with a valid user access token."""
    return {"Authorization": f"Bearer {token_mint.mint('user-1')}"}


@pytest.fixture
def fake_stats(fake_provider: str) -> Callable[[], dict]:
    """Reads the fake provider's counters and last request headers."""

    def read() -> dict:
        return orjson.loads(urllib3.request("GET", f"{fake_provider}/_fake/stats", timeout=5).data)

    return read


@pytest.fixture(scope="session")
def gateway_process(
    fake_provider: str,
    token_mint: TokenMint,
    amqp_prefix: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A real `python -m parley_gateway serve` (gunicorn, gevent workers) in front of the fake provider."""
    port = free_port()
    run_dir: Path = tmp_path_factory.mktemp("gateway")
    process = ServiceProcess(
        "gateway",
        python_module("parley_gateway", "serve"),
        env={
            "PARLEY_ENV": "test",
            "PARLEY_LLM_URL": fake_provider,
            "PARLEY_AUTH_URL": dead_url(),
            "PARLEY_JOBS_URL": dead_url(),
            "PARLEY_JWKS_URL": token_mint.jwks_url,
            "PARLEY_AMQP_URL": os.environ.get("PARLEY_TEST_AMQP_URL", DEFAULT_AMQP),
            "PARLEY_AMQP_PREFIX": amqp_prefix,
            "GATEWAY_BIND": f"127.0.0.1:{port}",
            "GATEWAY_WORKERS": "2",
            "GATEWAY_METRICS_DIR": str(run_dir / "metrics"),
            "GATEWAY_CLIENT_SECRET": secrets.token_urlsafe(24),
            "GATEWAY_MAX_BODY_BYTES": str(64 * 1024),
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_REDIS_PREFIX": f"{redis_prefix}gw-process:",
        },
        log_dir=run_dir,
        ready_url=f"http://127.0.0.1:{port}/livez",  # /readyz needs auth, which these tests do not run
    ).start()
    yield f"http://127.0.0.1:{port}"
    quick_stop(process)
