"""Unit tests (no network, no database server): settings, key material, password hashing, signing."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import subprocess
import sys
from pathlib import Path

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
from parley_auth.throttle import LoginAttempt, client_address


def test_defaults_match_the_design() -> None:
    settings = AuthSettings(_env_file=None)
    assert settings.service_name == "auth"
    assert settings.bind == "127.0.0.1:8081"
    assert (settings.worker_class, settings.threads, settings.workers) == ("gthread", 8, 2)
    assert settings.database_url == "sqlite:///.run/auth.db"
    assert (settings.access_token_ttl, settings.key_token_ttl, settings.refresh_token_ttl) == (900, 300, 2_592_000)
    assert set(settings.service_clients) == {"gateway", "jobs"}
    assert settings.registration == "open"
    assert (settings.login_window, settings.login_max_failures_per_account) == (900, 10)
    assert settings.login_max_failures_per_address > settings.login_max_failures_per_account


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


PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from Linux's /proc")
def test_hashing_gives_its_memory_back() -> None:
    """Eight threads hashing at once (a burst of logins on a gthread worker) leave the process about where one hash
    left it: each hash's 19 MiB goes back to the system, instead of staying in glibc's heap (~21 MB per thread)."""
    probe = """
import threading
from parley_auth.service import password_hasher
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024
password_hasher().hash("warm up")
before = rss()
threads = [threading.Thread(target=lambda: [password_hasher().hash("x") for _ in range(3)]) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(rss() - before)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert int(done.stdout) < 16  # MB; without the mapping threshold: ~60-150


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", None, "203.0.113.9"),  # a direct client
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # an untrusted peer cannot claim another address
        ("127.0.0.1", "198.51.100.1", "198.51.100.1"),  # the gateway says whom it forwards for
        ("127.0.0.1", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # what the client wrote itself is ignored
        ("127.0.0.1", "6.6.6.6, 198.51.100.1, 10.1.2.3", "198.51.100.1"),  # two trusted hops
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),  # garbage from a proxy: stay with what we can vouch for
        ("127.0.0.1", "", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1", "127.0.0.1"),  # a local client through the local gateway
        ("::ffff:127.0.0.1", "198.51.100.1", "198.51.100.1"),  # IPv4-mapped peers count as their IPv4 address
        ("127.0.0.1", " 2001:db8::1 ", "2001:db8::1"),
        (None, "198.51.100.1", "unknown"),
    ],
)
def test_client_address_trusts_forwarded_for_only_from_trusted_proxies(
    peer: str | None, forwarded: str | None, expected: str
) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


def test_client_address_with_no_trusted_proxy_is_the_peer() -> None:
    assert client_address("127.0.0.1", "198.51.100.1", ()) == "127.0.0.1"


def test_trusted_proxies_setting_takes_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AuthSettings(_env_file=None).trusted_proxies == (ipaddress.ip_network("127.0.0.1/32"),)
    monkeypatch.setenv("AUTH_TRUSTED_PROXIES", "10.0.0.0/8, ::1")
    assert AuthSettings(_env_file=None).trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    monkeypatch.setenv("AUTH_TRUSTED_PROXIES", "")
    assert AuthSettings(_env_file=None).trusted_proxies == ()
    monkeypatch.setenv("AUTH_TRUSTED_PROXIES", "gateway.local")
    with pytest.raises(ValidationError):
        AuthSettings(_env_file=None)


def test_login_attempt_counters_hash_the_email() -> None:
    attempt = LoginAttempt(email=" Someone@Example.com", address="198.51.100.1")
    assert attempt.account_subject == LoginAttempt(email="someone@example.com", address="x").account_subject
    assert "someone" not in attempt.account_subject and len(attempt.account_subject) <= 80
    assert attempt.address_subject == "address:198.51.100.1"
