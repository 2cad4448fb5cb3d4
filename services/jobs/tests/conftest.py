"""Fixtures for the jobs tests: a migrated PostgreSQL (or SQLite) database, the app, tokens and JSONL helpers."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask.testing import FlaskClient
from sqlalchemy import text

from parley_jobs import MIGRATIONS, create_app
from parley_jobs.settings import JobsSettings
from parley_kit.db import Database, upgrade
from parley_kit.testing import TokenMint

TABLES = ("batch_progress", "batch_items", "batches", "files", "outbox")


def jsonl(lines: list[Any]) -> bytes:
    """JSONL bytes from objects (strings are written as they are, to make bad lines)."""
    return b"".join((line.encode() if isinstance(line, str) else orjson.dumps(line)) + b"\n" for line in lines)


def chat_line(custom_id: str, text_: str = "hello", **extra: Any) -> dict[str, Any]:
    """A valid chat-completions request line."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text_}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


@pytest.fixture(scope="session")
def postgres_url(postgres: Any) -> str:
    """A PostgreSQL database migrated once for the session (tables are emptied before each test)."""
    url = postgres.create_database("jobs")
    upgrade(MIGRATIONS, url)
    return url


@pytest.fixture(params=["postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated database (PostgreSQL; tests that also run on SQLite parametrise this)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/jobs.db"
        upgrade(MIGRATIONS, url)
        return url
    url = request.getfixturevalue("postgres_url")
    db = Database(url)
    with db.transaction() as session:
        session.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
    db.dispose()
    return url


@pytest.fixture
def make_settings(
    database_url: str, token_mint: TokenMint, amqp_url: str, amqp_prefix: str
) -> Callable[..., JobsSettings]:
    """Settings for a test, overridable per field."""
    prefix = f"{amqp_prefix}.{uuid.uuid4().hex[:8]}"

    def make(**overrides: Any) -> JobsSettings:
        values: dict[str, Any] = {
            "environment": "test",
            "database_url": database_url,
            "jwks_url": token_mint.jwks_url,
            "amqp_url": amqp_url,
            "amqp_prefix": prefix,
            "client_secret": "test-secret",
            "max_file_bytes": 4096,
            "max_lines": 5,
            **overrides,
        }
        return JobsSettings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., JobsSettings]) -> JobsSettings:
    """The default test settings."""
    return make_settings()


@pytest.fixture
def app(settings: JobsSettings) -> Iterator[Any]:
    """The jobs app against the test database."""
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    app.extensions["parley_db"].dispose()


@pytest.fixture
def db(app: Any) -> Database:
    """The app's database, for looking behind the API."""
    return app.extensions["parley_db"]


@pytest.fixture
def client(app: Any) -> FlaskClient:
    """A test client."""
    return app.test_client()


@pytest.fixture
def auth(token_mint: TokenMint) -> Callable[..., dict[str, str]]:
    """Authorization headers for a user."""

    def headers(user: str = "user-a", **claims: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {token_mint.mint(user, **claims)}"}

    return headers


@pytest.fixture
def upload(client: FlaskClient, auth: Callable[..., dict[str, str]]) -> Callable[..., Any]:
    """POST /v1/files with the given content; returns the response."""

    def post(content: bytes, *, purpose: str = "batch", user: str = "user-a", filename: str = "in.jsonl") -> Any:
        return client.post(
            "/v1/files",
            data={"purpose": purpose, "file": (io.BytesIO(content), filename)},
            headers=auth(user),
            content_type="multipart/form-data",
        )

    return post


@pytest.fixture
def make_batch(client: FlaskClient, auth: Callable[..., dict[str, str]], upload: Callable[..., Any]) -> Callable:
    """Upload a file of `n` chat lines and create a batch from it; returns the Batch object."""

    def create(n: int = 3, *, user: str = "user-a", metadata: dict[str, str] | None = None) -> dict[str, Any]:
        file = upload(jsonl([chat_line(f"req-{i}", f"question {i}") for i in range(1, n + 1)]), user=user)
        assert file.status_code == 200, file.json
        body: dict[str, Any] = {
            "input_file_id": file.json["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        if metadata is not None:
            body["metadata"] = metadata
        response = client.post("/v1/batches", json=body, headers=auth(user))
        assert response.status_code == 200, response.json
        return response.json

    return create
