"""The whole platform as real processes on real PostgreSQL, RabbitMQ and Redis, once per test session."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from parley_kit.testing import LoopbackServer, PostgresServer, free_ports
from parley_platform import Platform, PlatformConfig, delete_broker_names


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything in this folder is the integration tier (`make test-unit` leaves it out)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@dataclass
class Client:
    """A registered user with an API key, as a new user of the gateway would have."""

    email: str
    password: str
    access_token: str
    api_key: str
    key_id: str


class LogCollector:
    """Listens where Logstash would (tcp, json_lines) and keeps every record the platform's processes ship."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = LoopbackServer(self._read, name="log-collector")  # one connection per shipping process
        self.port = self._server.port

    def _read(self, connection: socket.socket) -> None:
        """Keep each JSON line; a line that is not JSON is kept as such, so a test can see it."""
        with connection.makefile("rb") as lines:
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"unparsed": line.decode(errors="replace")}
                with self._lock:
                    self._records.append(record)

    def records(self) -> list[dict[str, Any]]:
        """A snapshot of everything received so far."""
        with self._lock:
            return list(self._records)

    def close(self) -> None:
        """Stop accepting (open connections end with their processes)."""
        self._server.close()


@dataclass
class RunningPlatform:
    """The started platform and ways to reach it."""

    platform: Platform
    config: PlatformConfig
    logs: LogCollector
    worker_metrics_port: int

    @property
    def gateway(self) -> str:
        """The public base URL."""
        return self.config.url("gateway")

    def url(self, name: str) -> str:
        """A process's base URL."""
        return self.config.url(name)

    def new_client(self) -> Client:
        """Register a fresh user through the gateway and give it an API key."""
        email = f"user-{uuid.uuid4().hex[:12]}@example.com"
        password = secrets.token_urlsafe(16)
        registered = requests.post(
            f"{self.gateway}/auth/register", json={"email": email, "password": password}, timeout=10
        )
        assert registered.status_code == 201, registered.text
        token = requests.post(f"{self.gateway}/auth/token", json={"email": email, "password": password}, timeout=10)
        assert token.status_code == 200, token.text
        access = token.json()["access_token"]
        key = requests.post(
            f"{self.gateway}/auth/api-keys",
            json={"name": "integration"},
            headers={"Authorization": f"Bearer {access}"},
            timeout=10,
        )
        assert key.status_code == 201, key.text
        return Client(email, password, access, key.json()["key"], key.json()["id"])


@pytest.fixture(scope="session")
def platform(
    postgres: PostgresServer,
    amqp_url: str,
    amqp_prefix: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningPlatform]:
    """auth, llm, jobs (API + worker), gateway and the fake provider, each its own process."""
    run_dir = tmp_path_factory.mktemp("platform")
    # Every process ships its ECS records to this collector, as they would to Logstash (tests/integration/
    # test_observability.py reads them); the worker serves its metrics on a port of its own.
    logs = LogCollector()
    names = ("gateway", "auth", "llm", "jobs", "fakeprovider")
    *service_ports, worker_metrics_port = free_ports(len(names) + 1)
    config = PlatformConfig(
        run_dir=run_dir,
        environment="test",
        database_urls={name: postgres.create_database(name) for name in ("auth", "llm", "jobs")},
        amqp_url=amqp_url,
        amqp_prefix=amqp_prefix,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        secrets={name: secrets.token_urlsafe(32) for name in ("gateway", "jobs", "pepper", "provider")},
        ports=dict(zip(names, service_ports, strict=True)),
        logstash=("127.0.0.1", logs.port),
        extra_env={"jobs-worker": {"JOBS_WORKER_METRICS_PORT": str(worker_metrics_port)}},
    )
    platform = Platform(config)
    platform.migrate()
    platform.start()
    try:
        yield RunningPlatform(platform, config, logs, worker_metrics_port)
    finally:
        platform.stop()
        logs.close()
        delete_broker_names(amqp_url, amqp_prefix)


@pytest.fixture
def client(platform: RunningPlatform) -> Client:
    """A fresh user with an API key."""
    return platform.new_client()
