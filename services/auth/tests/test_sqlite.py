"""The default embedded database: migrations and the main flow on a SQLite file (cheap, so run here too)."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from parley_auth import create_app
from parley_auth.settings import AuthSettings
from parley_kit.db import upgrade

MIGRATIONS = Path(__file__).resolve().parents[1] / "src" / "parley_auth" / "migrations"


def test_flow_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default URL is relative: .run/auth.db under the working directory
    settings = AuthSettings(
        _env_file=None,
        service_clients={"gateway": "sqlite-test-secret-0123"},
        amqp_url="amqp://guest:guest@127.0.0.1:9/%2F",
    )
    upgrade(MIGRATIONS, settings.database_url)
    app = create_app(settings)
    client = app.test_client()
    credentials = {"email": "lite@example.com", "password": "long enough"}
    assert client.post("/auth/register", json=credentials).status_code == 201
    tokens = client.post("/auth/token", json=credentials).json
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    key = client.post("/auth/api-keys", json={"name": "k", "allowed_models": ["m"]}, headers=headers).json
    service = client.post(
        "/auth/service-token", json={"client_id": "gateway", "client_secret": "sqlite-test-secret-0123"}
    ).json["access_token"]
    exchanged = client.post(
        "/auth/internal/key-exchange", json={"key": key["key"]}, headers={"Authorization": f"Bearer {service}"}
    )
    assert exchanged.status_code == 200
    assert jwt.decode(exchanged.json["access_token"], options={"verify_signature": False})["models"] == ["m"]
    rotated = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert rotated.status_code == 200
    assert client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 401
    assert client.post("/auth/refresh", json={"refresh_token": rotated.json["refresh_token"]}).status_code == 401
    assert client.get("/readyz").json == {"status": "ok", "checks": {"database": "ok"}}
    assert (tmp_path / ".run" / "auth.db").exists()
    app.extensions["parley_auth"].db.dispose()
