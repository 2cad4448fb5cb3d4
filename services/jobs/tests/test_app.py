"""App wiring: probes, settings defaults."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient

from parley_jobs import create_app
from parley_jobs.settings import JobsSettings


def test_ready_when_database_and_broker_answer(client: FlaskClient) -> None:
    assert client.get("/livez").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json["checks"] == {"database": "ok", "broker": "ok"}


def test_not_ready_without_the_broker(make_settings: Callable[..., JobsSettings]) -> None:
    app = create_app(make_settings(amqp_url="amqp://guest:guest@127.0.0.1:1/%2F"))
    response = app.test_client().get("/readyz")
    app.extensions["parley_db"].dispose()
    assert response.status_code == 503
    assert response.json["checks"]["broker"].startswith("failing")
    assert "127.0.0.1" not in response.get_data(as_text=True)


def test_errors_outside_v1_are_problem_json(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404 and response.mimetype == "application/problem+json"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No JOBS_/PARLEY_ variables from the developer's shell, and no stray .env."""
    for name in list(os.environ):
        if name.startswith(("JOBS_", "PARLEY_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir("/")
    return monkeypatch


def test_settings_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = JobsSettings()
    assert settings.service_name == "jobs"
    assert (settings.bind, settings.worker_class, settings.threads, settings.workers) == (
        "127.0.0.1:8083",
        "gthread",
        8,
        2,
    )
    assert settings.database_url == "sqlite:///.run/jobs.db"
    assert (settings.client_id, settings.client_secret) == ("jobs", "dev-insecure-jobs-secret")
    assert (settings.max_file_bytes, settings.max_lines) == (200 * 1024 * 1024, 50_000)
    assert (settings.worker_prefetch, settings.relay_interval, settings.delivery_limit) == (8, 0.2, 5)
    assert settings.relay_idle_interval == 1.0
    assert settings.item_timeout == 720
    assert settings.items_queue == "parley.jobs.items" and settings.dead_letter_exchange == "parley.jobs.dlx"


def test_env_overrides_and_the_placeholder_secret_is_refused_outside_development(
    clean_env: pytest.MonkeyPatch,
) -> None:
    monkeypatch = clean_env
    monkeypatch.setenv("JOBS_MAX_LINES", "7")
    monkeypatch.setenv("PARLEY_AMQP_PREFIX", "x")
    settings = JobsSettings()
    assert settings.max_lines == 7 and settings.items_queue == "x.jobs.items"
    monkeypatch.setenv("PARLEY_ENV", "production")
    with pytest.raises(ValueError, match="client_secret"):
        JobsSettings()
