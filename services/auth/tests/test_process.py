"""A real auth process (gunicorn, several workers, PostgreSQL): the kit's TokenVerifier against its JWKS.

The attacks of RFC 8725 must all end in 401; forged tokens signed with the real key (read from the database, as an
insider might) prove the claims checks, not just the signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from parley_auth.models import SigningKey
from parley_kit.errors import Unauthorized
from parley_kit.testing import free_port, python_module
from parley_kit.tokens import TokenVerifier
from parley_platform import start_service

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"


@dataclass
class RunningAuth:
    """The started process and how to reach it."""

    url: str
    db_url: str
    env: dict[str, str]
    cwd: Path

    def verifier(self) -> TokenVerifier:
        """A fresh verifier against the real JWKS (no cooldown, so each test sees new keys at once)."""
        return TokenVerifier(
            f"{self.url}/.well-known/jwks.json", issuer="parley-auth", audience="parley", refetch_cooldown=0
        )

    def signing_keys(self) -> list[SigningKey]:
        """The signing keys in the database, newest first."""
        engine = create_engine(self.db_url)
        with Session(engine) as session:
            keys = list(session.scalars(select(SigningKey).order_by(SigningKey.created_at.desc())))
        engine.dispose()
        return keys


@pytest.fixture(scope="module")
def running_auth(postgres: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAuth]:
    """`python -m parley_auth migrate` then `serve` with three workers racing to bootstrap a fresh database."""
    db_url = postgres.create_database("auth_process")
    port = free_port()
    workdir = tmp_path_factory.mktemp("auth-process")
    env = {
        "AUTH_DATABASE_URL": db_url,
        "AUTH_BIND": f"127.0.0.1:{port}",
        "AUTH_WORKERS": "3",
        "AUTH_METRICS_DIR": str(workdir / "metrics"),
        "PARLEY_ENV": "test",
        "AUTH_SERVICE_CLIENTS": json.dumps({"gateway": "process-test-secret-0123456789"}),
        "AUTH_API_KEY_PEPPER_SECRET": "process-test-pepper-0123456789",
        "PARLEY_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F",
    }
    process = start_service("auth", env, port=port, log_dir=workdir)
    try:
        yield RunningAuth(f"http://127.0.0.1:{port}", db_url, env, workdir)
    finally:
        process.stop()
        log = process.tail(400)
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def account(running_auth: RunningAuth) -> dict[str, Any]:
    """A registered user with a token pair."""
    email = f"proc-{uuid.uuid4().hex[:8]}@example.com"
    credentials = {"email": email, "password": PASSWORD}
    created = requests.post(f"{running_auth.url}/auth/register", json=credentials, timeout=10)
    assert created.status_code == 201, created.text
    tokens = requests.post(f"{running_auth.url}/auth/token", json=credentials, timeout=10)
    assert tokens.status_code == 200
    return {"id": created.json()["id"], "email": email, **tokens.json()}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(sub: str, **overrides: Any) -> dict[str, Any]:
    """Valid access-token claims, with overrides."""
    now = int(time.time())
    base = {
        "iss": "parley-auth",
        "aud": "parley",
        "sub": sub,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
        "typ": "access",
        "roles": ["member"],
    }
    return {**base, **overrides}


def test_workers_bootstrap_exactly_one_signing_key(running_auth: RunningAuth) -> None:
    assert len(running_auth.signing_keys()) == 1
    jwks = requests.get(f"{running_auth.url}/.well-known/jwks.json", timeout=10).json()
    assert [key["kid"] for key in jwks["keys"]] == [running_auth.signing_keys()[0].kid]


def test_a_real_token_verifies(running_auth: RunningAuth, account: dict[str, Any]) -> None:
    identity = running_auth.verifier().verify(account["access_token"])
    assert identity.subject == account["id"] and identity.roles == ("member",)


def test_forgeries_are_refused(running_auth: RunningAuth, account: dict[str, Any]) -> None:
    key = running_auth.signing_keys()[0]
    private_key = serialization.load_pem_private_key(key.private_key_pem.encode(), password=None)
    assert isinstance(private_key, Ed25519PrivateKey)

    def signed(payload: dict[str, Any], *, kid: str = key.kid, signer: Ed25519PrivateKey = private_key) -> str:
        return jwt.encode(payload, signer, algorithm="EdDSA", headers={"kid": kid})

    def hs256(payload: dict[str, Any], secret: bytes) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
        body = _b64(json.dumps(payload).encode())
        mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64(mac)}"

    sub = account["id"]
    public = private_key.public_key()
    public_pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'kid': key.kid}).encode())}.{_b64(json.dumps(claims(sub)).encode())}."

    # The control: a token forged with the real key and valid claims does verify, so each refusal below is the check.
    assert running_auth.verifier().verify(signed(claims(sub))).subject == sub

    attacks = {
        "alg none": unsigned,
        "HS256 with the public key PEM": hs256(claims(sub), public_pem),
        "HS256 with the raw public key": hs256(claims(sub), public_raw),
        "unknown kid": signed(claims(sub), kid="kid_unknown", signer=Ed25519PrivateKey.generate()),
        "real kid, other key": signed(claims(sub), signer=Ed25519PrivateKey.generate()),
        "wrong aud": signed(claims(sub, aud="someone-else")),
        "wrong iss": signed(claims(sub, iss="https://evil.example")),
        "expired beyond leeway": signed(claims(sub, iat=int(time.time()) - 600, exp=int(time.time()) - 60)),
        "typ refresh": signed(claims(sub, typ="refresh")),
        "no typ": signed({k: v for k, v in claims(sub).items() if k != "typ"}),
        "no kid": jwt.encode(claims(sub), private_key, algorithm="EdDSA"),
        "garbage": "not.a.token",
    }
    verifier = running_auth.verifier()
    for name, token in attacks.items():
        with pytest.raises(Unauthorized):
            verifier.verify(token)
        # The service's own endpoints refuse it as well.
        me = requests.get(f"{running_auth.url}/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert me.status_code == 401, name
        assert me.headers["content-type"].startswith("application/problem+json")


def test_rotation_keeps_old_tokens_valid(running_auth: RunningAuth, account: dict[str, Any]) -> None:
    old_kid = jwt.get_unverified_header(account["access_token"])["kid"]
    rotate = subprocess.run(
        python_module("parley_auth", "rotate-keys"),
        env={**os.environ, **running_auth.env},
        cwd=running_auth.cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rotate.returncode == 0, rotate.stderr
    login = requests.post(
        f"{running_auth.url}/auth/token", json={"email": account["email"], "password": PASSWORD}, timeout=10
    )
    new_token = login.json()["access_token"]
    new_kid = jwt.get_unverified_header(new_token)["kid"]
    assert new_kid != old_kid and new_kid == running_auth.signing_keys()[0].kid
    jwks = requests.get(f"{running_auth.url}/.well-known/jwks.json", timeout=10).json()
    published = {key["kid"] for key in jwks["keys"]}
    assert published == {old_kid, new_kid}
    verifier = running_auth.verifier()
    assert verifier.verify(account["access_token"]).subject == account["id"]
    assert verifier.verify(new_token).subject == account["id"]
    # Every worker accepts the new key's tokens on its own endpoints (its verifier refetches the unknown kid).
    deadline = time.monotonic() + 10
    for _ in range(9):
        me = requests.get(f"{running_auth.url}/auth/me", headers={"Authorization": f"Bearer {new_token}"}, timeout=10)
        while me.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # a worker's local key cache refreshes at most once a second
            me = requests.get(
                f"{running_auth.url}/auth/me", headers={"Authorization": f"Bearer {new_token}"}, timeout=10
            )
        assert me.status_code == 200


def test_process_api_key_round_trip(running_auth: RunningAuth, account: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {account['access_token']}"}
    created = requests.post(f"{running_auth.url}/auth/api-keys", json={"name": "sdk"}, headers=headers, timeout=10)
    assert created.status_code == 201
    service = requests.post(
        f"{running_auth.url}/auth/service-token",
        json={"client_id": "gateway", "client_secret": "process-test-secret-0123456789"},
        timeout=10,
    ).json()["access_token"]
    verifier = running_auth.verifier()
    assert verifier.verify(service).is_service
    exchanged = requests.post(
        f"{running_auth.url}/auth/internal/key-exchange",
        json={"key": created.json()["key"]},
        headers={"Authorization": f"Bearer {service}"},
        timeout=10,
    )
    assert exchanged.status_code == 200
    identity = verifier.verify(exchanged.json()["access_token"])
    assert identity.subject == account["id"] and identity.key_id == created.json()["id"]
    # Revocation, even with the broker down, commits and takes effect.
    deleted = requests.delete(f"{running_auth.url}/auth/api-keys/{created.json()['id']}", headers=headers, timeout=30)
    assert deleted.status_code == 204
    again = requests.post(
        f"{running_auth.url}/auth/internal/key-exchange",
        json={"key": created.json()["key"]},
        headers={"Authorization": f"Bearer {service}"},
        timeout=10,
    )
    assert again.status_code == 401
