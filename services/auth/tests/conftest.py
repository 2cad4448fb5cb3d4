"""Fixtures for the auth tests: a migrated PostgreSQL database, apps built on it, and small client helpers."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from parley_auth import create_app
from parley_auth.settings import AuthSettings
from parley_kit.db import upgrade

MIGRATIONS = Path(__file__).resolve().parents[1] / "src" / "parley_auth" / "migrations"
PASSWORD = "correct horse battery staple"
SERVICE_CLIENTS = {"gateway": "gateway-test-secret-0123456789", "jobs": "jobs-test-secret-0123456789"}
# Nothing listens here, so a test that does not care about events never waits on a broker.
NO_BROKER = "amqp://guest:guest@127.0.0.1:9/%2F"


@pytest.fixture(scope="session")
def auth_db_url(postgres: Any) -> str:
    """A PostgreSQL database migrated to head, shared by the service tests (each test uses its own emails)."""
    url = postgres.create_database("auth")
    upgrade(MIGRATIONS, url)
    return url


@pytest.fixture
def fresh_db_url(postgres: Any) -> Callable[[str], str]:
    """A new PostgreSQL database migrated to head, for tests that need an empty one."""

    def make(name: str) -> str:
        url = postgres.create_database(name)
        upgrade(MIGRATIONS, url)
        return url

    return make


@pytest.fixture
def make_settings(auth_db_url: str) -> Callable[..., AuthSettings]:
    """Settings pointing at the test database, with overrides."""

    def make(**overrides: Any) -> AuthSettings:
        values: dict[str, Any] = {
            "database_url": auth_db_url,
            "service_clients": SERVICE_CLIENTS,
            "api_key_pepper_secret": "pepper-for-tests-0123456789",
            "amqp_url": NO_BROKER,
            "environment": "test",
            **overrides,
        }
        return AuthSettings(**values)

    return make


@pytest.fixture
def client(make_settings: Callable[..., AuthSettings]) -> Iterator[FlaskClient]:
    """A test client of an app on the PostgreSQL test database."""
    app = create_app(make_settings())
    yield app.test_client()
    app.extensions["parley_auth"].db.dispose()


@dataclass
class Account:
    """A registered user and their first token pair."""

    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        """Authorization with the access token."""
        return bearer(self.access_token)


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def unique_email() -> str:
    """An email no other test uses."""
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture
def signup(client: FlaskClient) -> Callable[..., Account]:
    """Register and log in a new user."""

    def make(email: str | None = None, password: str = PASSWORD) -> Account:
        email = email or unique_email()
        created = client.post("/auth/register", json={"email": email, "password": password})
        assert created.status_code == 201, created.json
        tokens = client.post("/auth/token", json={"email": email, "password": password})
        assert tokens.status_code == 200, tokens.json
        return Account(created.json["id"], email, password, tokens.json["access_token"], tokens.json["refresh_token"])

    return make


@pytest.fixture
def service_token(client: FlaskClient) -> Callable[[str], str]:
    """A service token for a configured client."""

    def make(client_id: str = "gateway") -> str:
        response = client.post(
            "/auth/service-token", json={"client_id": client_id, "client_secret": SERVICE_CLIENTS[client_id]}
        )
        assert response.status_code == 200, response.json
        return response.json["access_token"]

    return make


@pytest.fixture
def make_admin(client: FlaskClient) -> Callable[[], Account]:
    """A new admin account (created directly, as `create-admin` does) and its first token pair."""
    from parley_auth import service

    def make() -> Account:
        email = unique_email()
        with client.application.extensions["parley_auth"].db.transaction() as session:
            user_id = service.create_user(session, email=email, password=PASSWORD, role="admin").id
        tokens = client.post("/auth/token", json={"email": email, "password": PASSWORD})
        assert tokens.status_code == 200, tokens.json
        return Account(user_id, email, PASSWORD, tokens.json["access_token"], tokens.json["refresh_token"])

    return make
