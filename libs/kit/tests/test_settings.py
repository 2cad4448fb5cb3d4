"""Settings: shared `PARLEY_*` aliases, per-service prefixes, frozen objects, placeholder secrets refused."""

from __future__ import annotations

import os
import tempfile

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from parley_kit.settings import PLACEHOLDER_PREFIX, ServiceSettings


class XSettings(ServiceSettings):
    """A service's settings as the services write them."""

    model_config = SettingsConfigDict(
        env_prefix="X_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    service_name: str = "xsvc"
    client_secret: str = f"{PLACEHOLDER_PREFIX}client"
    database_url: str = "sqlite:///x.db"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment without Parley variables."""
    for name in list(os.environ):
        if name.startswith(("PARLEY_", "X_")):
            monkeypatch.delenv(name)


def test_shared_fields_read_their_parley_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ENV", "test")
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("PARLEY_LOGSTASH_HOST", "logstash.internal")
    monkeypatch.setenv("PARLEY_LOGSTASH_PORT", "5044")
    monkeypatch.setenv("PARLEY_AMQP_PREFIX", "ci-42")
    monkeypatch.setenv("PARLEY_JWKS_URL", "http://auth:8081/.well-known/jwks.json")
    settings = ServiceSettings()
    assert settings.environment == "test"
    assert settings.log_level == "DEBUG"
    assert settings.logstash_host == "logstash.internal"
    assert settings.logstash_port == 5044
    assert settings.amqp_name("events") == "ci-42.events"
    assert settings.jwks_url == "http://auth:8081/.well-known/jwks.json"


def test_subclass_reads_own_fields_with_prefix_and_shared_ones_without(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_BIND", "127.0.0.1:9555")
    monkeypatch.setenv("X_WORKERS", "3")
    monkeypatch.setenv("X_WORKER_CLASS", "gthread")
    monkeypatch.setenv("X_DATABASE_URL", "postgresql+psycopg://db/x")
    monkeypatch.setenv("PARLEY_ENV", "test")
    monkeypatch.setenv("X_CLIENT_SECRET", "a-real-secret")
    monkeypatch.setenv("PARLEY_AUTH_URL", "http://auth.example:8081")
    # Unprefixed own fields and prefixed shared fields belong to nobody: they must be ignored.
    monkeypatch.setenv("WORKERS", "9")
    monkeypatch.setenv("X_PARLEY_ENV", "production")
    monkeypatch.setenv("X_AUTH_URL", "http://wrong")
    settings = XSettings()
    assert settings.bind == "127.0.0.1:9555"
    assert settings.workers == 3
    assert settings.worker_class == "gthread"
    assert settings.database_url == "postgresql+psycopg://db/x"
    assert settings.environment == "test"
    assert settings.auth_url == "http://auth.example:8081"


def test_settings_read_dotenv_in_the_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / ".env").write_text("X_WORKERS=5\nPARLEY_LOG_LEVEL=WARNING\n")
    monkeypatch.chdir(tmp_path)
    settings = XSettings()
    assert (settings.workers, settings.log_level) == (5, "WARNING")


def test_fields_can_be_given_by_name() -> None:
    settings = XSettings(environment="test", workers=4, log_level="ERROR", client_secret="a-real-secret")
    assert (settings.environment, settings.workers, settings.log_level) == ("test", 4, "ERROR")


def test_settings_are_frozen() -> None:
    settings = XSettings()
    with pytest.raises(ValidationError):
        settings.workers = 7  # type: ignore[misc]
    assert settings.workers == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [("X_WORKERS", "0"), ("X_WORKERS", "many"), ("X_WORKER_CLASS", "eventlet"), ("PARLEY_ENV", "staging")],
)
def test_invalid_values_are_refused_at_start_up(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        XSettings()


@pytest.mark.parametrize("prefix", ["Has-Upper", "-leading", "a" * 80, "with space"])
def test_amqp_prefix_must_be_a_safe_name(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    monkeypatch.setenv("PARLEY_AMQP_PREFIX", prefix)
    with pytest.raises(ValidationError):
        ServiceSettings()


def test_placeholder_secret_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ENV", "production")
    with pytest.raises(ValidationError, match="client_secret still holds a development placeholder"):
        XSettings()


def test_errors_never_echo_secret_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ENV", "production")
    monkeypatch.setenv("X_CLIENT_SECRET", "hunter2-very-secret")
    monkeypatch.setenv("X_DATABASE_URL", "postgresql://app:pa55word@db/x")
    monkeypatch.setenv("X_WORKERS", "0")
    with pytest.raises(ValidationError, match="workers") as caught:
        XSettings()
    assert "hunter2" not in str(caught.value)
    assert "pa55word" not in str(caught.value)


def test_placeholder_error_never_echoes_other_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ENV", "production")
    monkeypatch.setenv("X_DATABASE_URL", "postgresql://app:pa55word@db/x")
    with pytest.raises(ValidationError, match="client_secret") as caught:
        XSettings(client_secret=f"{PLACEHOLDER_PREFIX}zzz")
    assert "pa55word" not in str(caught.value)
    assert f"{PLACEHOLDER_PREFIX}zzz" not in str(caught.value)


def test_placeholder_secret_refused_in_test_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ENV", "test")
    with pytest.raises(ValidationError, match="client_secret"):
        XSettings()


def test_placeholder_secret_accepted_in_development() -> None:
    settings = XSettings()
    assert settings.is_development
    assert settings.client_secret.startswith(PLACEHOLDER_PREFIX)


def test_real_secret_accepted_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_ENV", "production")
    monkeypatch.setenv("X_CLIENT_SECRET", "s3cr3t-from-the-vault")
    settings = XSettings()
    assert not settings.is_development
    assert settings.client_secret == "s3cr3t-from-the-vault"


def test_metrics_path_defaults_per_service_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_BIND", "0.0.0.0:9123")
    first = XSettings()
    monkeypatch.setenv("X_BIND", "0.0.0.0:9124")
    second = XSettings()
    assert first.metrics_path == os.path.join(tempfile.gettempdir(), "parley-metrics", "xsvc-9123")
    assert second.metrics_path.endswith("xsvc-9124")


def test_metrics_dir_overrides_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("X_METRICS_DIR", str(tmp_path / "m"))
    assert XSettings().metrics_path == str(tmp_path / "m")
