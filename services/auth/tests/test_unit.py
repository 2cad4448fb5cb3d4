"""Unit tests (no network, no database server): settings, key material, password hashing, signing."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from pydantic import ValidationError

from parley_auth.service import (
    API_KEY_PREFIX,
    dummy_hash,
    hash_api_key,
    new_api_key,
    password_hasher,
)
from parley_auth.settings import AuthSettings


def test_defaults_match_the_design() -> None:
    settings = AuthSettings(_env_file=None)
    assert settings.service_name == "auth"
    assert settings.bind == "127.0.0.1:8081"
    assert (settings.worker_class, settings.threads, settings.workers) == ("gthread", 8, 2)
    assert settings.database_url == "sqlite:///.run/auth.db"
    assert (settings.access_token_ttl, settings.key_token_ttl, settings.refresh_token_ttl) == (900, 300, 2_592_000)
    assert set(settings.service_clients) == {"gateway", "jobs"}
    assert settings.registration == "open"


def test_settings_read_the_auth_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTH_SERVICE_CLIENTS", '{"jobs": "from-the-environment-123"}')
    monkeypatch.setenv("AUTH_REGISTRATION", "closed")
    monkeypatch.setenv("AUTH_KEY_TOKEN_TTL", "120")
    settings = AuthSettings(_env_file=None)
    assert settings.service_clients == {"jobs": "from-the-environment-123"}
    assert settings.registration == "closed" and settings.key_token_ttl == 120
    with pytest.raises(ValidationError, match="frozen"):
        settings.registration = "open"  # type: ignore[misc]


def test_placeholders_are_refused_outside_development() -> None:
    real = {"api_key_pepper_secret": "a-real-pepper-0123456789", "service_clients": {"jobs": "a-real-secret-012"}}
    AuthSettings(_env_file=None, environment="production", **real)
    with pytest.raises(ValidationError, match="service_clients"):
        AuthSettings(
            _env_file=None,
            environment="production",
            api_key_pepper_secret="a-real-pepper-0123456789",
            service_clients={"jobs": "dev-insecure-jobs-secret"},
        )
    with pytest.raises(ValidationError, match="api_key_pepper_secret"):
        AuthSettings(_env_file=None, environment="test", service_clients={"jobs": "a-real-secret-012"})


@pytest.mark.parametrize(
    "overrides",
    [
        {"registration": "sometimes"},
        {"service_clients": {"bad id!": "secret-secret"}},
        {"service_clients": {"jobs": ""}},
        {"admin_email": "root@example.com"},
        {"admin_email": "root@example.com", "admin_password": "short"},
        {"access_token_ttl": 0},
    ],
)
def test_bad_settings_stop_start_up(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuthSettings(_env_file=None, **overrides)


def test_api_keys_have_256_random_bits_and_a_peppered_hash() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100
    key = keys.pop()
    assert key.startswith(API_KEY_PREFIX) and len(key) == len(API_KEY_PREFIX) + 43
    digest = hash_api_key(key, pepper="pepper-one-0123456789")
    assert digest == hmac.new(b"pepper-one-0123456789", key.encode(), hashlib.sha256).hexdigest()
    assert digest != hash_api_key(key, pepper="pepper-two-0123456789")
    assert key not in digest


def test_passwords_use_argon2id_at_owasp_parameters() -> None:
    hasher = password_hasher()
    assert (hasher.time_cost, hasher.memory_cost, hasher.parallelism) == (2, 19456, 1)
    hashed = hasher.hash("a password")
    assert hashed.startswith("$argon2id$") and "m=19456,t=2,p=1" in hashed
    assert dummy_hash().startswith("$argon2id$") and dummy_hash() == dummy_hash()
