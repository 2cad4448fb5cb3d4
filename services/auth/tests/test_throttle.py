"""Service tests (PostgreSQL, and SQLite for the upsert): login throttling per account and per client address."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from flask_openapi3 import OpenAPI
from sqlalchemy import select

from parley_auth import create_app
from parley_auth.models import LoginFailures
from parley_auth.settings import AuthSettings
from parley_auth.throttle import LoginAttempt
from parley_kit.db import upgrade

MIGRATIONS = Path(__file__).resolve().parents[1] / "src" / "parley_auth" / "migrations"
_addresses = itertools.count(1)


def new_address() -> str:
    """A client address no other test uses (the per-address counters live in the shared test database)."""
    n = next(_addresses)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def login(client: FlaskClient, email: str, password: str, address: str, **headers: str) -> Any:
    """POST /auth/token as if from `address` (the test client's direct peer)."""
    return client.post(
        "/auth/token",
        json={"email": email, "password": password},
        environ_base={"REMOTE_ADDR": address},
        headers=headers,
    )


def failures_of(app: OpenAPI, subject: str) -> int | None:
    """The current count stored for a counter."""
    with app.extensions["parley_auth"].db.transaction() as session:
        return session.scalar(select(LoginFailures.failures).where(LoginFailures.subject == subject))


def age_counters(app: OpenAPI, seconds: int) -> None:
    """Move every counter's window back in time, as if `seconds` had passed."""
    with app.extensions["parley_auth"].db.transaction() as session:
        for row in session.scalars(select(LoginFailures)):  # in Python: SQLite has no datetime arithmetic in SQL
            row.window_started_at -= timedelta(seconds=seconds)


@pytest.fixture
def throttled_app(make_settings: Callable[..., AuthSettings]) -> Iterator[Callable[..., OpenAPI]]:
    """Apps on the shared database with throttle overrides, disposed afterwards."""
    apps: list[OpenAPI] = []

    def make(**overrides: Any) -> OpenAPI:
        app = create_app(make_settings(**overrides))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["parley_auth"].db.dispose()


def test_eleven_wrong_passwords_then_even_the_right_one_is_throttled(
    client: FlaskClient, signup: Callable[..., Any]
) -> None:
    account = signup()
    address = new_address()
    for _ in range(10):
        assert login(client, account.email, "wrong password", address).status_code == 401
    eleventh = login(client, account.email, "wrong password", address)
    assert eleventh.status_code == 429
    assert eleventh.mimetype == "application/problem+json"
    assert eleventh.json["code"] == "login_throttled" and eleventh.json["status"] == 429
    assert 0 < int(eleventh.headers["Retry-After"]) <= 900

    # The right password right after: still throttled, from this address and from any other.
    right = login(client, account.email, account.password, address)
    assert right.status_code == 429 and "Retry-After" in right.headers
    assert login(client, account.email, account.password, new_address()).status_code == 429
    assert account.password not in right.get_data(as_text=True)

    # Once the window has passed, the right password works again and the account's count starts over.
    age_counters(client.application, 901)
    assert login(client, account.email, account.password, address).status_code == 200
    assert failures_of(client.application, LoginAttempt(account.email, address).account_subject) is None


def test_retry_after_counts_down_to_the_end_of_the_window(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    address = new_address()
    for _ in range(10):
        login(client, account.email, "wrong password", address)
    age_counters(client.application, 600)
    throttled = login(client, account.email, account.password, address)
    assert throttled.status_code == 429
    assert 290 <= int(throttled.headers["Retry-After"]) <= 300


def test_unknown_and_known_accounts_are_throttled_alike(client: FlaskClient, signup: Callable[..., Any]) -> None:
    known = signup()
    unknown = f"nobody-{new_address()}@example.com"
    answers = {}
    for email in (known.email, unknown):
        address = new_address()
        for _ in range(10):
            assert login(client, email, "wrong password", address).status_code == 401
        answers[email] = login(client, email, "wrong password", address)
    assert answers[known.email].status_code == answers[unknown].status_code == 429
    assert answers[known.email].get_data() == answers[unknown].get_data()
    assert "Retry-After" in answers[unknown].headers


def test_a_successful_login_resets_the_account_count(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    address = new_address()
    for _ in range(9):
        login(client, account.email, "wrong password", address)
    assert login(client, account.email, account.password, address).status_code == 200
    for _ in range(9):
        assert login(client, account.email, "wrong password", address).status_code == 401
    assert login(client, account.email, account.password, address).status_code == 200
    # The address's count is kept: one good account must not launder an address's failures.
    assert failures_of(client.application, LoginAttempt("", address).address_subject) == 18


def test_failures_are_shared_by_every_process(
    throttled_app: Callable[..., OpenAPI], signup: Callable[..., Any]
) -> None:
    account = signup()
    first, second = throttled_app().test_client(), throttled_app().test_client()
    address = new_address()
    for index in range(10):
        assert login((first, second)[index % 2], account.email, "wrong password", address).status_code == 401
    assert login(first, account.email, account.password, address).status_code == 429
    assert login(second, account.email, account.password, address).status_code == 429


def test_concurrent_failures_are_all_counted(throttled_app: Callable[..., OpenAPI]) -> None:
    app = throttled_app(login_max_failures_per_account=1000, login_max_failures_per_address=1000)
    email, address = f"race-{new_address()}@example.com", new_address()
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: login(app.test_client(), email, "wrong", address).status_code, range(16)))
    assert codes == [401] * 16
    assert failures_of(app, LoginAttempt(email, address).account_subject) == 16
    assert failures_of(app, LoginAttempt(email, address).address_subject) == 16


def test_per_address_throttling_spans_accounts(
    throttled_app: Callable[..., OpenAPI], signup: Callable[..., Any]
) -> None:
    client = throttled_app(login_max_failures_per_address=5).test_client()
    victim = signup()
    address = new_address()
    for index in range(5):  # one guess each at five accounts: under every account's limit
        assert login(client, f"guess-{index}-{victim.email}", "wrong password", address).status_code == 401
    blocked = login(client, victim.email, victim.password, address)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    # The account itself is fine from elsewhere.
    assert login(client, victim.email, victim.password, new_address()).status_code == 200


def test_forwarded_for_counts_only_behind_a_trusted_proxy(
    throttled_app: Callable[..., OpenAPI], signup: Callable[..., Any]
) -> None:
    client = throttled_app(login_max_failures_per_address=3).test_client()
    account = signup()

    # An untrusted peer cannot spread its failures over made-up addresses.
    direct = new_address()
    for index in range(3):
        login(client, f"x{index}-{account.email}", "wrong", direct, **{"X-Forwarded-For": new_address()})
    assert login(client, account.email, account.password, direct).status_code == 429

    # Behind the gateway (127.0.0.1, trusted) the client is the address the gateway appended...
    client_ip = new_address()
    for index in range(3):
        spoofed = f"{new_address()}, {client_ip}"  # ...whatever the client wrote in front of it
        login(client, f"y{index}-{account.email}", "wrong", "127.0.0.1", **{"X-Forwarded-For": spoofed})
    assert (
        login(client, account.email, account.password, "127.0.0.1", **{"X-Forwarded-For": client_ip}).status_code == 429
    )
    # ...and another client behind the same gateway is not affected.
    other = login(client, account.email, account.password, "127.0.0.1", **{"X-Forwarded-For": new_address()})
    assert other.status_code == 200


def test_throttling_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    upgrade(MIGRATIONS, url)
    settings = AuthSettings(
        _env_file=None,
        database_url=url,
        service_clients={"gateway": "sqlite-test-secret-0123"},
        amqp_url="amqp://guest:guest@127.0.0.1:9/%2F",
        login_max_failures_per_account=3,
    )
    app = create_app(settings)
    client = app.test_client()
    credentials = {"email": "lite@example.com", "password": "long enough"}
    assert client.post("/auth/register", json=credentials).status_code == 201
    for _ in range(3):
        assert login(client, credentials["email"], "wrong", "198.51.100.7").status_code == 401
    assert login(client, credentials["email"], credentials["password"], "198.51.100.7").status_code == 429
    assert failures_of(app, LoginAttempt(credentials["email"], "").account_subject) == 3
    age_counters(app, 901)
    assert login(client, credentials["email"], "wrong", "198.51.100.7").status_code == 401
    assert failures_of(app, LoginAttempt(credentials["email"], "").account_subject) == 1  # a new window
    assert login(client, credentials["email"], credentials["password"], "198.51.100.7").status_code == 200
    app.extensions["parley_auth"].db.dispose()
