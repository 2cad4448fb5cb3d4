"""Fixtures of the OWASP API Top 10 suite (issue #9): an HTTP client that checks every error it receives, a real
admin made the way operators make one, a canary socket for SSRF, a tightly limited second gateway, and the route
inventory read from the services' own OpenAPI documents."""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import pytest
import requests

from parley_kit.processes import ServiceProcess, free_port, python_module
from parley_kit.testing import LoopbackServer
from parley_platform import start_service

if TYPE_CHECKING:
    from conftest import Client, RunningPlatform

# ----- error bodies: every error the suite provokes is checked where it happens --------------------------------

# What an error body must never carry: a traceback, a path on this machine, a secret, a token, SQL.
LEAKS = {
    "traceback": re.compile(r"Traceback|File \""),
    "filesystem path": re.compile(r"/work/|/home/|site-packages|\.py\"|\.py\b"),
    "api key": re.compile(r"sk-pl-[A-Za-z0-9_-]{8,}"),
    "jwt": re.compile(r"eyJ[A-Za-z0-9_-]{8,}"),
    "sql statement": re.compile(r"\bSELECT\b|\bINSERT INTO\b|\bUPDATE \w+ SET\b|\bDELETE FROM\b"),
    "database driver": re.compile(r"psycopg|sqlalchemy|sqlite3", re.I),
}


def expected_shape(path: str) -> str:
    """The error shape a route answers in (docs/design.md, Errors): Anthropic, OpenAI or problem+json."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    return "problem"


def shape_problems(response: requests.Response, shape: str) -> list[str]:
    """Why this error response is not in `shape` (empty when it is)."""
    try:
        body = response.json()
    except ValueError:
        return [f"not JSON: {response.text[:200]!r}"]
    content_type = response.headers.get("Content-Type", "")
    problems = []
    if shape == "openai":
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error.get("type"):
            problems.append(f"not OpenAI's error shape: {body}")
        elif not {"message", "type", "param", "code"} <= set(error):
            problems.append(f"OpenAI error without message/type/param/code: {body}")
    elif shape == "anthropic":
        error = body.get("error") if isinstance(body, dict) else None
        well_formed = isinstance(error, dict) and error.get("type") and error.get("message")
        if body.get("type") != "error" or not well_formed:
            problems.append(f"not Anthropic's error shape: {body}")
    else:
        if not content_type.startswith("application/problem+json"):
            problems.append(f"problem+json expected, got {content_type!r}")
        if not isinstance(body, dict) or body.get("status") != response.status_code or not body.get("title"):
            problems.append(f"not a problem document for {response.status_code}: {body}")
    return problems


@dataclass
class ErrorCheck:
    """Checks every error response the suite receives and keeps a record of them (for the catalogue test)."""

    forbidden_values: dict[str, str]
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, response: requests.Response, path: str, *, shape: str | None = None) -> None:
        """Assert a 4xx/5xx is a clean body in its route's shape: no 500, no traceback, path, key, token or SQL."""
        if response.status_code < 400:
            return
        where = f"{response.request.method} {path} → {response.status_code}"
        text = response.text
        assert response.status_code < 500 or response.status_code in (502, 503, 504), f"{where}: {text[:500]}"
        for name, pattern in LEAKS.items():
            assert not pattern.search(text), f"{where} leaks a {name}: {text[:500]}"
        for name, value in self.forbidden_values.items():
            assert value not in text, f"{where} leaks the {name}"
        problems = shape_problems(response, shape or expected_shape(path))
        assert not problems, f"{where}: {problems}"
        with self.lock:
            self.seen.append((response.request.method or "", path, response.status_code))


class Http:
    """`requests` with a timeout, where every error answer goes through the ErrorCheck."""

    def __init__(self, check: ErrorCheck) -> None:
        self.check = check
        self.session = requests.Session()

    def request(self, method: str, url: str, *, shape: str | None = None, **kwargs: Any) -> requests.Response:
        """One call; an error answer is checked before the caller sees it."""
        kwargs.setdefault("timeout", 60)
        response = self.session.request(method, url, **kwargs)
        self.check.check(response, requests.utils.urlparse(url).path, shape=shape)
        return response

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        """GET."""
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        """POST."""
        return self.request("POST", url, **kwargs)


@pytest.fixture(scope="session")
def error_check(platform: RunningPlatform) -> ErrorCheck:
    """One checker for the whole suite; the platform's secrets must never appear in an error body."""
    return ErrorCheck({f"{name} secret": value for name, value in platform.config.secrets.items()})


@pytest.fixture(scope="session")
def http(error_check: ErrorCheck) -> Http:
    """The suite's HTTP client."""
    return Http(error_check)


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def subject(token: str) -> str:
    """The user id (`sub`) of one of auth's access tokens."""
    return jwt.decode(token, options={"verify_signature": False})["sub"]


# ----- users ----------------------------------------------------------------------------------------------------


@dataclass
class Admin:
    """An admin made with auth's `create-admin` command, logged in through the gateway."""

    email: str
    password: str
    access_token: str
    user_id: str


@pytest.fixture(scope="session")
def admin(platform: RunningPlatform) -> Admin:
    """The operator's way to make an admin (`python -m parley_auth create-admin`, against auth's database),
    then an ordinary login: the token carries the admin role."""
    email, password = f"admin-{uuid.uuid4().hex[:10]}@example.com", secrets.token_urlsafe(16)
    created = subprocess.run(
        python_module("parley_auth", "create-admin", "--email", email, "--password", password),
        env=platform.platform.processes["auth"].env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    login = requests.post(f"{platform.gateway}/auth/token", json={"email": email, "password": password}, timeout=30)
    assert login.status_code == 200, login.text
    token = login.json()["access_token"]
    assert jwt.decode(token, options={"verify_signature": False})["roles"] == ["admin"]
    return Admin(email, password, token, subject(token))


@pytest.fixture
def alice(platform: RunningPlatform) -> Client:
    """The victim: a fresh user with an API key."""
    return platform.new_client()


@pytest.fixture
def bob(platform: RunningPlatform) -> Client:
    """The attacker: another fresh user with an API key of their own."""
    return platform.new_client()


# ----- SSRF canary ----------------------------------------------------------------------------------------------


class Canary:
    """A real listening socket that records every connection made to it (nobody should make one)."""

    def __init__(self) -> None:
        self.connections: list[bytes] = []
        self._lock = threading.Lock()
        self._server = LoopbackServer(self._record, name="ssrf-canary")
        self.port = self._server.port

    @property
    def url(self) -> str:
        """Where the canary listens."""
        return self._server.url

    def _record(self, connection: socket.socket) -> None:
        connection.settimeout(2)
        try:
            first = connection.recv(4096)
        except OSError:
            first = b""
        with self._lock:
            self.connections.append(first)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def recorded(self) -> list[bytes]:
        """What connected so far (first bytes of each connection)."""
        with self._lock:
            return list(self.connections)

    def close(self) -> None:
        """Stop listening."""
        self._server.close()


@pytest.fixture(scope="session")
def canary() -> Iterator[Canary]:
    """The SSRF canary for the session."""
    listening = Canary()
    yield listening
    listening.close()


# ----- a second gateway with tight limits, in front of the shared platform ---------------------------------------

LIMITED_RPM = 3
LIMITED_BODY_BYTES = 256 * 1024


@pytest.fixture(scope="session")
def limited_gateway(platform: RunningPlatform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway process with a 3 requests/minute key limit and a 256 KiB body limit, its own Redis prefix, in front
    of the shared platform's auth, llm and jobs (the operator's legitimate way to set low limits)."""
    run_dir: Path = tmp_path_factory.mktemp("limited-gateway")
    port = free_port()
    env = {
        **platform.platform.processes["gateway"].env,
        "GATEWAY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_WORKERS": "1",
        "GATEWAY_METRICS_DIR": str(run_dir / "metrics"),
        "GATEWAY_REDIS_PREFIX": f"{platform.config.redis_prefix}security-{uuid.uuid4().hex[:8]}:",
        "GATEWAY_RATE_LIMIT_KEY_RPM": str(LIMITED_RPM),
        "GATEWAY_MAX_BODY_BYTES": str(LIMITED_BODY_BYTES),
        "GATEWAY_ACCESS_LOG": "false",
    }
    process: ServiceProcess = start_service("gateway", env, port=port, log_dir=run_dir, timeout=90)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop(signum=2)  # SIGINT: gunicorn's quick shutdown


# ----- the route inventory --------------------------------------------------------------------------------------

HTTP_METHODS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Documents:
    """Each service's OpenAPI document as the gateway's /docs serves it (and the gateway's own)."""

    by_service: dict[str, dict[str, Any]]

    def routes(self) -> dict[tuple[str, str], str]:
        """(METHOD, templated path) → the service documenting it."""
        found: dict[tuple[str, str], str] = {}
        for service, document in self.by_service.items():
            for path, item in document["paths"].items():
                for method in HTTP_METHODS:
                    if method in item:
                        found[(method.upper(), path)] = service
        return found


@pytest.fixture(scope="session")
def documents(platform: RunningPlatform) -> Documents:
    """Each service's own `/openapi/openapi.json` (the source of the gateway's /docs, which leaves out the routes the
    edge hides; attacks straight at a service must cover those too) plus the gateway's own."""
    by_service = {}
    for service in ("auth", "llm", "jobs"):
        response = requests.get(f"{platform.url(service)}/openapi/openapi.json", timeout=30)
        assert response.status_code == 200, response.text
        by_service[service] = response.json()
    own = requests.get(f"{platform.gateway}/openapi/openapi.json", timeout=30)
    assert own.status_code == 200, own.text
    by_service["gateway"] = own.json()
    return Documents(by_service)
