"""Pytest fixtures for real backing services and real service processes (a pytest plugin: `-p parley_kit.testing`).

Backing services come from environment URLs first (`PARLEY_TEST_POSTGRES_URL`, `PARLEY_TEST_AMQP_URL`,
`PARLEY_TEST_REDIS_URL`, defaulting to this machine's local servers), then from testcontainers where a Docker
engine answers. Under CI (`CI=true`) a missing backing service fails the run instead of skipping tests.
Every run gets fresh databases, a fresh AMQP name prefix and a fresh Redis key prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from .processes import ServiceProcess, free_port, free_ports, python_module

__all__ = ["ServiceProcess", "TokenMint", "free_port", "free_ports", "python_module"]

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

RUN_ID = uuid.uuid4().hex[:10]


def in_ci() -> bool:
    """True on CI, where a missing backing service is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str, why: str) -> None:
    """Fail under CI, skip on a developer's machine."""
    message = f"{what} is not reachable ({why}); start it (see README) or set its PARLEY_TEST_* URL"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _docker_answers() -> bool:
    with contextlib.suppress(Exception):
        import docker  # testcontainers' dependency

        docker.from_env().ping()
        return True
    return False


# ----- PostgreSQL -----------------------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A PostgreSQL server on which tests create (and drop) their own databases."""

    admin_url: str
    created: list[str] = field(default_factory=list)

    def create_database(self, name: str) -> str:
        """Create a fresh database named after this run and return its SQLAlchemy URL."""
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        # Unique per call: two suites asking for "jobs" in one run must not drop each other's database.
        database = f"parley_{RUN_ID}_{len(self.created)}_{name}"[:63]
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{database}"'))
            connection.execute(text(f'CREATE DATABASE "{database}"'))
        engine.dispose()
        self.created.append(database)
        return make_url(self.admin_url).set(database=database).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Drop every database this run created (terminating leftover connections first)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            for database in self.created:
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"), {"d": database}
                )
                connection.execute(text(f'DROP DATABASE IF EXISTS "{database}"'))
        engine.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The PostgreSQL server for this run."""
    from sqlalchemy import create_engine, text

    url = os.environ.get("PARLEY_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    container = None
    try:
        engine = create_engine(url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        if not _docker_answers():
            unavailable("PostgreSQL", type(exc).__name__)
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver="psycopg").start()
        url = container.get_connection_url()
    server = PostgresServer(url)
    yield server
    server.drop_all()
    if container is not None:
        container.stop()


class LoopbackServer:
    """A TCP server of a test's own on a free loopback port: each connection is given to `handle` on a daemon thread
    of its own (socketserver's threading server), and closed when `handle` returns. For the stand-ins a test listens
    with: a Logstash collector, a misbehaving upstream, an SSRF canary."""

    def __init__(self, handle: Callable[[socket.socket], None], *, name: str) -> None:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                handle(self.request)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.daemon_threads = True  # a handler that hangs on purpose must not hold up the end of the test run
        server.block_on_close = False
        server.allow_reuse_address = True
        server.server_bind()
        server.server_activate()
        self._server = server
        self.port: int = server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()

    def close(self) -> None:
        """Stop accepting (connections already open go on until their handlers return)."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    """`serve(handle)` starts a `LoopbackServer` giving each connection to `handle` and returns its URL; every
    server started is closed after the test."""
    servers: list[LoopbackServer] = []

    def start(handle: Callable[[socket.socket], None]) -> str:
        servers.append(LoopbackServer(handle, name="test-server"))
        return servers[-1].url

    yield start
    for server in servers:
        server.close()


CHAT_ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'


def send_json(
    connection: socket.socket, body: bytes = CHAT_ANSWER, *, status: bytes = b"200 OK", headers: bytes = b""
) -> None:
    """For a `LoopbackServer` handler: one JSON answer with its Content-Length (`headers`: extra CRLF-ended lines)."""
    connection.sendall(
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
        % (status, len(body), headers, body)
    )


@pytest.fixture
def egress_proxy(
    serve: Callable[[Callable[[socket.socket], None]], str], monkeypatch: pytest.MonkeyPatch
) -> list[bytes]:
    """An HTTP proxy of the test's own, named by HTTP_PROXY (the other proxy variables cleared): it answers every
    request with `CHAT_ANSWER` and keeps each request's head, in the list this fixture gives."""
    heads: list[bytes] = []

    def proxy(connection: socket.socket) -> None:
        while head := read_http_request(connection):
            heads.append(head)
            send_json(connection)

    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", serve(proxy))
    return heads


def read_http_request(connection: socket.socket) -> bytes:
    """For a `LoopbackServer` handler: one HTTP request's head (its Content-Length body read and dropped), or b""
    when the client closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head


def modules_loaded(code: str, modules: tuple[str, ...], env: dict[str, str] | None = None) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after running `code`: what a process of a service pays for in
    memory (a module a service never uses should not be among them)."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])  # the last line: log lines may come before it
    return loaded


def eventually(condition: Any, seconds: float = 30.0, step: float = 0.1) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False): for what travels asynchronously (events,
    shipped logs, restarts), without asserting how long it took."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


@contextlib.contextmanager
def backend_killed_at(engine: Any, statement_prefix: str) -> Iterator[list[int]]:
    """The first statement of `engine` starting with `statement_prefix` runs on a connection PostgreSQL has just
    terminated (pg_terminate_backend from another session, as a restart or an operator would): what a lost connection
    mid-request looks like. Yields the killed backend pids (empty if the statement never ran)."""
    from sqlalchemy import create_engine, event, text

    admin = create_engine(engine.url, pool_size=1, max_overflow=0)
    killed: list[int] = []

    def kill(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.startswith(statement_prefix) and not killed:
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            killed.append(pid)

    event.listen(engine, "before_cursor_execute", kill)
    try:
        yield killed
    finally:
        event.remove(engine, "before_cursor_execute", kill)
        admin.dispose()


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The RabbitMQ URL for this run (names are isolated by `amqp_prefix`)."""
    import pika

    url = os.environ.get("PARLEY_TEST_AMQP_URL", DEFAULT_AMQP)
    container = None
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except Exception as exc:  # noqa: BLE001
        if not _docker_answers():
            unavailable("RabbitMQ", type(exc).__name__)
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-alpine").start()
        params = container.get_connection_params()
        url = f"amqp://guest:guest@{params.host}:{params.port}/%2F"
    yield url
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def amqp_prefix() -> str:
    """A broker name prefix no other run uses."""
    return f"parley-test-{RUN_ID}"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis URL for this run (keys are isolated by `redis_prefix`)."""
    import redis

    url = os.environ.get("PARLEY_TEST_REDIS_URL", DEFAULT_REDIS)
    container = None
    try:
        redis.Redis.from_url(url).ping()
    except Exception as exc:  # noqa: BLE001
        if not _docker_answers():
            unavailable("Redis", type(exc).__name__)
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7-alpine").start()
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
    yield url
    if container is not None:
        container.stop()


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other run uses; its keys are deleted at the end."""
    import redis

    prefix = f"parley-test-{RUN_ID}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


# ----- tokens for service tests ---------------------------------------------------------------------------------


class TokenMint:
    """Signs access tokens with a throwaway Ed25519 key and serves its JWKS on a local port.

    For a service's own tests, where the real auth service is not running; integration tests use the real one.
    """

    def __init__(self, issuer: str = "parley-auth", audience: str = "parley") -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import jwt
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.issuer, self.audience = issuer, audience
        self.kid = f"test-{uuid.uuid4().hex[:8]}"
        self.private_key = Ed25519PrivateKey.generate()
        public_jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.private_key.public_key()))
        jwks = json.dumps({"keys": [{**public_jwk, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(jwks)))
                self.end_headers()
                self.wfile.write(jwks)

            def log_message(self, *_args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.jwks_url = f"http://127.0.0.1:{self._server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def mint(self, subject: str, *, roles: tuple[str, ...] = ("member",), ttl: int = 600, **claims: object) -> str:
        """A signed access token for `subject` with extra claims (`key_id`, `models`, `act`, ...)."""
        import jwt

        now = int(time.time())
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "typ": "access",
            "roles": list(roles),
            **claims,
        }
        return jwt.encode(payload, self.private_key, algorithm="EdDSA", headers={"kid": self.kid})

    def close(self) -> None:
        """Stop serving the JWKS."""
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def token_mint() -> Iterator[TokenMint]:
    """A JWKS server and signer standing in for auth in a service's own tests."""
    mint = TokenMint()
    yield mint
    mint.close()
