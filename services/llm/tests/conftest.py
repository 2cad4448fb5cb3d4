"""Fixtures: the fake provider as a real process, the llm app on PostgreSQL, tokens from the kit's mint."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from parley_kit.db import Database, upgrade
from parley_kit.testing import ServiceProcess, TokenMint, free_port, python_module
from parley_llm import MIGRATIONS_DIR, budgets, create_app
from parley_llm.settings import BUNDLED_MODELS_FILE, LlmSettings

PROVIDER_KEY = "canary-provider-key-7f3a9c1e5b"


def start_fake_provider(log_dir: Path) -> tuple[ServiceProcess, str]:
    """Start a fake provider (one worker, so its config and stats are one set) requiring PROVIDER_KEY."""
    port = free_port()
    process = ServiceProcess(
        "fakeprovider",
        python_module("parley_fakeprovider", "--port", str(port)),
        env={"FAKE_PROVIDER_API_KEY": PROVIDER_KEY},
        log_dir=log_dir,
        ready_url=f"http://127.0.0.1:{port}/healthz",
    )
    process.start()
    return process, f"http://127.0.0.1:{port}"


def start_llm(fake_url: str, database_url: str, jwks_url: str, log_dir: Path, **env: str) -> ServiceProcess:
    """Start `python -m parley_llm serve` (gunicorn + gevent) on a free port; `.base_url` says where."""
    port = free_port()
    values = {
        "LLM_BIND": f"127.0.0.1:{port}",
        "LLM_WORKERS": "2",
        "LLM_WORKER_CLASS": "gevent",
        "LLM_DATABASE_URL": database_url,
        "LLM_OPENAI_BASE_URL": f"{fake_url}/v1",
        "LLM_ANTHROPIC_BASE_URL": fake_url,
        "LLM_OPENAI_API_KEY": PROVIDER_KEY,
        "LLM_ANTHROPIC_API_KEY": PROVIDER_KEY,
        "LLM_METRICS_DIR": str(log_dir / "metrics"),
        "PARLEY_JWKS_URL": jwks_url,
        "PARLEY_ENV": "test",
        **env,
    }
    (log_dir / "metrics").mkdir(exist_ok=True)
    process = ServiceProcess(
        "llm",
        python_module("parley_llm", "serve"),
        env=values,
        log_dir=log_dir,
        ready_url=f"http://127.0.0.1:{port}/readyz",
    )
    try:
        process.start(timeout=180)  # the machine may be busy: several workers import the SDKs at once
    except BaseException:
        process.stop()
        raise
    process.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return process


@pytest.fixture(scope="session")
def fake_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake provider on a free port, requiring PROVIDER_KEY; yields its base URL."""
    process, url = start_fake_provider(tmp_path_factory.mktemp("fake"))
    yield url
    process.stop()


@pytest.fixture(scope="session")
def database_url(postgres) -> str:  # type: ignore[no-untyped-def]
    """A fresh PostgreSQL database migrated to head."""
    url = postgres.create_database("llm_service")
    upgrade(MIGRATIONS_DIR, url)
    return url


def llm_settings(fake_provider: str, database_url: str, token_mint: TokenMint, **overrides: object) -> LlmSettings:
    """Settings pointing at the fake provider, the test database and the test JWKS."""
    values: dict[str, object] = {
        "database_url": database_url,
        "jwks_url": token_mint.jwks_url,
        "openai_base_url": f"{fake_provider}/v1",
        "anthropic_base_url": fake_provider,
        "openai_api_key": PROVIDER_KEY,
        "anthropic_api_key": PROVIDER_KEY,
        "connect_timeout": 2.0,
        "first_byte_timeout": 5.0,
        "total_timeout": 20.0,
        # Tests fail calls on purpose: a shared app must not open its breakers on the next test (test_resilience
        # and test_routing test the breaker on their own).
        "breaker_failures": 1000,
    }
    values.update(overrides)
    return LlmSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def app(fake_provider: str, database_url: str, token_mint: TokenMint):  # type: ignore[no-untyped-def]
    """The llm app on PostgreSQL."""
    app = create_app(llm_settings(fake_provider, database_url, token_mint))
    yield app
    app.extensions["parley_llm"].close()


class Client:
    """The Flask test client, buffered so each response is closed (and the ledger settled) like under gunicorn."""

    def __init__(self, app, token: str | None) -> None:  # type: ignore[no-untyped-def]
        self._client = app.test_client()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, path: str, **kwargs):  # type: ignore[no-untyped-def]
        """POST with the token."""
        return self._client.post(path, headers={**self.headers, **kwargs.pop("headers", {})}, buffered=True, **kwargs)

    def get(self, path: str, **kwargs):  # type: ignore[no-untyped-def]
        """GET with the token."""
        return self._client.get(path, headers={**self.headers, **kwargs.pop("headers", {})}, buffered=True, **kwargs)


@pytest.fixture(scope="session")
def provider_key() -> str:
    """The key the fake provider requires (a canary: it must never be shown)."""
    return PROVIDER_KEY


@pytest.fixture(scope="session")
def make_app(fake_provider: str, database_url: str, token_mint: TokenMint):  # type: ignore[no-untyped-def]
    """Build another llm app with settings overrides (closed at the end of the session)."""
    apps = []

    def make(**overrides: object):  # type: ignore[no-untyped-def]
        values = {"database_url": database_url, **overrides}
        url = str(values.pop("database_url"))
        apps.append(create_app(llm_settings(fake_provider, url, token_mint, **values)))
        return apps[-1]

    yield make
    for app in apps:
        app.extensions["parley_llm"].close()


@pytest.fixture(scope="session")
def make_client():  # type: ignore[no-untyped-def]
    """A buffered test client for an app with a bearer token (or none)."""
    return Client


@pytest.fixture
def user(request: pytest.FixtureRequest) -> str:
    """A user id unique to the test, so ledger assertions see only its own rows."""
    return f"user-{request.node.name}"[:120]


@pytest.fixture
def client(app, token_mint: TokenMint, user: str) -> Client:  # type: ignore[no-untyped-def]
    """A client with a member token for `user`."""
    return Client(app, token_mint.mint(user, key_id="key-1"))


def usage_rows(database_url: str, user: str) -> list[dict]:
    """The ledger rows of one user, oldest first."""
    engine = create_engine(database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT * FROM usage_records WHERE user_id = :u ORDER BY id"), {"u": user}
        ).mappings()
        result = [dict(row) for row in rows]
    engine.dispose()
    return result


@pytest.fixture
def rows(database_url: str, user: str):  # type: ignore[no-untyped-def]
    """A callable returning this test user's ledger rows."""
    return lambda: usage_rows(database_url, user)


def repo_root() -> Path:
    """The workspace root (for processes that need a working directory)."""
    return Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def spawn():  # type: ignore[no-untyped-def]
    """Start extra fake providers / llm processes (`spawn.fake(dir)`, `spawn.llm(...)`), all stopped at the end."""

    class Spawner:
        def __init__(self) -> None:
            self.processes: list[ServiceProcess] = []

        def fake(self, log_dir: Path) -> str:
            process, url = start_fake_provider(log_dir)
            self.processes.append(process)
            return url

        def llm(self, *args: Any, **env: str) -> ServiceProcess:
            self.processes.append(start_llm(*args, **env))
            return self.processes[-1]

    spawner = Spawner()
    yield spawner
    for process in reversed(spawner.processes):
        process.stop()


RACE_USER = "race-user"
DIME_MODELS = {
    "prices": {  # $0.10 per output token, input free
        "dime-gpt": {"input": 0, "output": 100000},
        "dime-claude": {"input": 0, "output": 100000},
    },
    "models": {
        "dime-gpt": {"provider": "openai", "upstream_model": "gpt-4o-mini"},
        "dime-claude": {"provider": "anthropic", "upstream_model": "claude-haiku-4-5"},
    },
}


@pytest.fixture(scope="session")
def dime_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A models file of the dime models alone (price version `test-dime`): costs in tests are exact."""
    path = tmp_path_factory.mktemp("prices") / "models.yaml"
    prices = {"price_version": "test-dime", **DIME_MODELS["prices"]}
    path.write_text(yaml.safe_dump({"prices": prices, "models": DIME_MODELS["models"]}))
    return str(path)


@pytest.fixture(scope="session")
def llm_db(postgres) -> str:  # type: ignore[no-untyped-def]
    """The served process's database, with a $1.00 daily budget for RACE_USER set before the workers start."""
    url = postgres.create_database("llm_process")
    upgrade(MIGRATIONS_DIR, url)
    db = Database(url)
    with db.transaction() as session:
        budgets.put_budget(
            session,
            scope=budgets.Scope.USER,
            subject_id=RACE_USER,
            limit_usd=Decimal("1.00"),
            period=budgets.Period.DAY,
        )
    db.dispose()
    return url


@pytest.fixture(scope="session")
def llm(fake_provider: str, llm_db: str, token_mint, tmp_path_factory, spawn) -> ServiceProcess:  # type: ignore[no-untyped-def]
    """One `python -m parley_llm serve` (3 gevent workers) for the process tests: the bundled models plus dime-gpt."""
    models = yaml.safe_load(Path(BUNDLED_MODELS_FILE).read_text())
    models["prices"].update(DIME_MODELS["prices"])
    models["models"].update(DIME_MODELS["models"])
    models_file = tmp_path_factory.mktemp("models") / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    return spawn.llm(
        fake_provider,
        llm_db,
        token_mint.jwks_url,
        tmp_path_factory.mktemp("llm"),
        LLM_WORKERS="3",
        LLM_MODELS_FILE=str(models_file),
        LLM_BREAKER_FAILURES="1000",
    )
