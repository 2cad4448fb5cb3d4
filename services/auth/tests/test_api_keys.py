"""Service tests (PostgreSQL): API keys, service accounts, key exchange, act-as, and what the database holds."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from flask.testing import FlaskClient
from sqlalchemy import make_url, select

from parley_auth.models import ApiKey, Base

PG_DUMP = shutil.which("pg_dump")


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def create_key(client: FlaskClient, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post("/auth/api-keys", json={"name": "laptop", **body}, headers=headers)
    assert response.status_code == 201, response.json
    return response.json


def test_create_list_and_revoke_keys(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    created = create_key(client, account.headers, allowed_models=["gpt-4o-mini"])
    assert set(created) == {"id", "name", "prefix", "key", "created_at", "expires_at"}
    assert created["id"].startswith("key_")
    assert created["key"].startswith("sk-pl-") and len(created["key"]) == len("sk-pl-") + 43
    assert created["prefix"] == created["key"][:12]

    listed = client.get("/auth/api-keys", headers=account.headers)
    assert listed.status_code == 200 and listed.json["object"] == "list"
    assert [item["id"] for item in listed.json["data"]] == [created["id"]]
    item = listed.json["data"][0]
    assert set(item) == {"id", "name", "prefix", "created_at", "last_used_at", "expires_at"}
    assert created["key"] not in listed.get_data(as_text=True)

    assert client.delete(f"/auth/api-keys/{created['id']}", headers=account.headers).status_code == 204
    assert client.get("/auth/api-keys", headers=account.headers).json["data"] == []
    assert client.delete(f"/auth/api-keys/{created['id']}", headers=account.headers).status_code == 404


def test_a_users_keys_are_invisible_to_others(client: FlaskClient, signup: Callable[..., Any]) -> None:
    owner, other = signup(), signup()
    created = create_key(client, owner.headers)
    assert client.get("/auth/api-keys", headers=other.headers).json["data"] == []
    assert client.delete(f"/auth/api-keys/{created['id']}", headers=other.headers).status_code == 404
    assert len(client.get("/auth/api-keys", headers=owner.headers).json["data"]) == 1


def test_key_requests_are_validated(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    bad_bodies = [
        {},
        {"name": ""},
        {"name": "x" * 201},
        {"name": "k", "expires_at": past},
        {"name": "k", "expires_at": "2999-01-01T00:00:00"},  # naive: whose midnight?
        {"name": "k", "expires_at": "tomorrow"},
        {"name": "k", "allowed_models": []},
        {"name": "k", "allowed_models": "gpt-4o"},
        {"name": "k", "allowed_models": [""]},
    ]
    for body in bad_bodies:
        response = client.post("/auth/api-keys", json=body, headers=account.headers)
        assert response.status_code == 400, body
        assert response.mimetype == "application/problem+json"
    assert client.post("/auth/api-keys", json={"name": "k"}).status_code == 401
    assert client.delete("/auth/api-keys/bad%20id", headers=account.headers).status_code == 400


def test_service_token_needs_the_right_secret(client: FlaskClient) -> None:
    credentials = {"client_id": "jobs", "client_secret": "jobs-test-secret-0123456789"}
    good = client.post("/auth/service-token", json=credentials)
    assert good.status_code == 200 and good.json["token_type"] == "bearer"
    claims = claims_of(good.json["access_token"])
    assert claims["sub"] == "svc:jobs" and claims["roles"] == ["service"] and claims["typ"] == "access"
    wrong = client.post("/auth/service-token", json={"client_id": "jobs", "client_secret": "guess"})
    unknown = client.post("/auth/service-token", json={"client_id": "nobody", "client_secret": "guess"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.get_data() == unknown.get_data()


def test_key_exchange(client: FlaskClient, signup: Callable[..., Any], service_token: Callable[..., str]) -> None:
    account = signup()
    created = create_key(client, account.headers, allowed_models=["gpt-4o-mini", "claude-haiku"])
    gateway = auth(service_token("gateway"))

    exchanged = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=gateway)
    assert exchanged.status_code == 200
    body = exchanged.json
    assert body["user_id"] == account.id and body["key_id"] == created["id"] and body["expires_in"] == 300
    claims = claims_of(body["access_token"])
    assert claims["sub"] == account.id and claims["key_id"] == created["id"]
    assert claims["models"] == ["gpt-4o-mini", "claude-haiku"] and claims["roles"] == ["member"]
    assert claims["exp"] - claims["iat"] == 300

    listed = client.get("/auth/api-keys", headers=account.headers).json["data"][0]
    assert listed["last_used_at"] is not None
    first_use = listed["last_used_at"]
    client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=gateway)
    assert client.get("/auth/api-keys", headers=account.headers).json["data"][0]["last_used_at"] == first_use

    # A user (or a key-derived token) may not exchange keys: only services.
    as_user = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=account.headers)
    assert as_user.status_code == 403
    key_token = auth(body["access_token"])
    again = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=key_token)
    assert again.status_code == 403
    # A key-derived token cannot manage keys either.
    assert client.post("/auth/api-keys", json={"name": "escalate"}, headers=key_token).status_code == 403

    for bogus in ("sk-pl-" + "A" * 43, "not-a-key"):
        refused = client.post("/auth/internal/key-exchange", json={"key": bogus}, headers=gateway)
        assert refused.status_code == 401 and refused.json["code"] == "invalid_api_key"

    assert client.delete(f"/auth/api-keys/{created['id']}", headers=account.headers).status_code == 204
    revoked = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=gateway)
    assert revoked.status_code == 401


def test_key_exchange_respects_key_expiry_and_disabled_users(
    client: FlaskClient, signup: Callable[..., Any], service_token: Callable[..., str]
) -> None:
    account = signup()
    soon = (datetime.now(UTC) + timedelta(seconds=120)).isoformat()
    created = create_key(client, account.headers, expires_at=soon)
    gateway = auth(service_token())
    exchanged = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=gateway).json
    assert 100 <= exchanged["expires_in"] <= 120  # the key's expiry caps the token
    assert "models" not in claims_of(exchanged["access_token"])

    db = client.application.extensions["parley_auth"].db
    with db.transaction() as session:
        session.get(ApiKey, created["id"]).expires_at = datetime.now(UTC) - timedelta(seconds=1)
    expired = client.post("/auth/internal/key-exchange", json={"key": created["key"]}, headers=gateway)
    assert expired.status_code == 401

    live = create_key(client, account.headers)
    with db.transaction() as session:
        from parley_auth.models import User

        session.get(User, account.id).disabled = True
    disabled = client.post("/auth/internal/key-exchange", json={"key": live["key"]}, headers=gateway)
    assert disabled.status_code == 401


def test_act_as(client: FlaskClient, signup: Callable[..., Any], service_token: Callable[..., str]) -> None:
    account = signup()
    key = create_key(client, account.headers, allowed_models=["m1"])
    jobs = auth(service_token("jobs"))

    plain = client.post("/auth/internal/act-as", json={"user_id": account.id}, headers=jobs)
    assert plain.status_code == 200 and plain.json["expires_in"] == 900
    claims = claims_of(plain.json["access_token"])
    assert claims["sub"] == account.id and claims["act"] == {"sub": "svc:jobs"} and claims["roles"] == ["member"]
    assert "key_id" not in claims

    with_key = client.post("/auth/internal/act-as", json={"user_id": account.id, "key_id": key["id"]}, headers=jobs)
    assert with_key.status_code == 200
    claims = claims_of(with_key.json["access_token"])
    assert claims["key_id"] == key["id"] and claims["models"] == ["m1"]

    as_user = client.post("/auth/internal/act-as", json={"user_id": account.id}, headers=account.headers)
    assert as_user.status_code == 403
    acting = auth(plain.json["access_token"])  # an act-as token is not a service token
    assert client.post("/auth/internal/act-as", json={"user_id": account.id}, headers=acting).status_code == 403
    assert client.post("/auth/internal/act-as", json={"user_id": "user_missing"}, headers=jobs).status_code == 404
    other = signup()
    stolen_key = {"user_id": other.id, "key_id": key["id"]}
    assert client.post("/auth/internal/act-as", json=stolen_key, headers=jobs).status_code == 404
    assert client.post("/auth/internal/act-as", json={}, headers=jobs).status_code == 400
    assert client.post("/auth/internal/act-as", json={"user_id": account.id}).status_code == 401


def _pg_dump(url: str) -> str:
    """The database as `pg_dump` writes it (the password goes by environment, never on the command line)."""
    parsed = make_url(url)
    command = [
        PG_DUMP or "pg_dump",
        "--no-owner",
        "--host",
        parsed.host or "127.0.0.1",
        "--port",
        str(parsed.port or 5432),
        "--username",
        parsed.username or "postgres",
        "--dbname",
        parsed.database or "",
    ]
    env = {**os.environ, "PGPASSWORD": parsed.password or ""}
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def test_secrets_are_stored_only_hashed(
    client: FlaskClient,
    signup: Callable[..., Any],
    service_token: Callable[..., str],
    make_admin: Callable[[], Any],
    auth_db_url: str,
) -> None:
    account = signup()
    admin = make_admin()
    key = create_key(client, account.headers)["key"]
    refreshed = client.post("/auth/refresh", json={"refresh_token": account.refresh_token}).json["refresh_token"]
    client.post("/auth/internal/key-exchange", json={"key": key}, headers=auth(service_token()))
    invite = client.post("/auth/invites", json={}, headers=admin.headers).json["code"]
    secrets = {
        "API key": key,
        "API key body": key[len("sk-pl-") :],
        "password": account.password,
        "first refresh token": account.refresh_token,
        "rotated refresh token": refreshed,
        "admin refresh token": admin.refresh_token,
        "invite code": invite,
        "invite code body": invite[len("inv-") :],
    }

    db = client.application.extensions["parley_auth"].db
    dump = []
    with db.transaction() as session:
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)):
                dump.append(" ".join(str(value) for value in row))
    text = "\n".join(dump)
    assert account.email in text  # the scan does see the rows
    for name, secret in secrets.items():
        assert secret not in text, name

    if PG_DUMP is None:
        pytest.skip("pg_dump is not installed")
    dumped = _pg_dump(auth_db_url)
    assert account.email in dumped and "COPY public.invites" in dumped
    for name, secret in secrets.items():
        assert secret not in dumped, name
