"""Service tests (PostgreSQL): registration, login, refresh rotation and replay, logout, /auth/me, admin."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jwt
from flask.testing import FlaskClient
from sqlalchemy import func, select

from parley_auth import create_app
from parley_auth.models import RefreshToken, SigningKey, User
from parley_auth.settings import AuthSettings


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    """Claims without verification (the verification tests are in test_process.py)."""
    return jwt.decode(token, options={"verify_signature": False})


def test_register_lowercases_email_and_refuses_duplicates(client: FlaskClient) -> None:
    created = client.post("/auth/register", json={"email": "Mixed.Case@Example.COM", "password": "long enough"})
    assert created.status_code == 201
    assert created.json["email"] == "mixed.case@example.com"
    assert created.json["id"].startswith("user_")
    assert created.json["role"] == "member"
    assert set(created.json) == {"id", "email", "role", "created_at"}
    again = client.post("/auth/register", json={"email": "mixed.case@example.com", "password": "long enough"})
    assert again.status_code == 409
    assert again.mimetype == "application/problem+json"
    assert again.json["code"] == "email_taken"


def test_registration_input_is_validated_without_echoing_it(client: FlaskClient) -> None:
    cases = [
        {"email": "not-an-email", "password": "long enough"},
        {"email": "short@example.com", "password": "seven77"},
        {"email": "long@example.com", "password": "x" * 257},
        {"email": "missing@example.com"},
        [],
    ]
    for body in cases:
        response = client.post("/auth/register", json=body)
        assert response.status_code == 400, body
        assert response.mimetype == "application/problem+json"
        assert "seven77" not in response.get_data(as_text=True)
    assert client.post("/auth/register", data="{", content_type="application/json").status_code == 400
    assert client.post("/auth/register", data="email=x", content_type="text/plain").status_code == 400


def test_login_returns_a_pair_with_the_design_claims(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    response = client.post("/auth/token", json={"email": account.email.upper(), "password": account.password})
    assert response.status_code == 200
    body = response.json
    assert body["token_type"] == "bearer" and body["expires_in"] == 900
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "EdDSA" and header["kid"].startswith("kid_")
    claims = claims_of(body["access_token"])
    assert set(claims) == {"iss", "aud", "sub", "exp", "iat", "jti", "typ", "roles"}
    assert claims["sub"] == account.id and claims["typ"] == "access" and claims["roles"] == ["member"]
    assert claims["iss"] == "parley-auth" and claims["aud"] == "parley"
    assert claims["exp"] - claims["iat"] == 900


def test_unknown_user_and_wrong_password_get_the_same_answer(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    wrong = client.post("/auth/token", json={"email": account.email, "password": "not the password"})
    unknown = client.post("/auth/token", json={"email": "nobody@example.com", "password": "not the password"})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.get_data() == unknown.get_data()
    assert wrong.mimetype == unknown.mimetype == "application/problem+json"


def test_me_needs_a_valid_token(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    me = client.get("/auth/me", headers=account.headers)
    assert me.status_code == 200 and me.json["id"] == account.id and me.json["email"] == account.email
    assert client.get("/auth/me").status_code == 401
    assert client.get("/auth/me", headers=auth("garbage")).status_code == 401
    assert client.get("/auth/me", headers={"Authorization": "Basic abc"}).status_code == 401


def test_refresh_rotates_and_a_replay_revokes_the_family(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    first = client.post("/auth/refresh", json={"refresh_token": account.refresh_token})
    assert first.status_code == 200
    rotated = first.json["refresh_token"]
    assert rotated != account.refresh_token
    assert claims_of(first.json["access_token"])["sub"] == account.id

    # An attacker replays the spent token: refused, and the whole family dies with it...
    replay = client.post("/auth/refresh", json={"refresh_token": account.refresh_token})
    assert replay.status_code == 401
    assert replay.json["code"] == "invalid_refresh_token"
    # ...so the legitimate holder's next refresh fails too.
    assert client.post("/auth/refresh", json={"refresh_token": rotated}).status_code == 401

    # A fresh login starts a new family that works.
    login = client.post("/auth/token", json={"email": account.email, "password": account.password})
    assert client.post("/auth/refresh", json={"refresh_token": login.json["refresh_token"]}).status_code == 200


def test_unknown_and_expired_refresh_tokens_are_refused(
    client: FlaskClient, make_settings: Callable[..., AuthSettings], signup: Callable[..., Any]
) -> None:
    assert client.post("/auth/refresh", json={"refresh_token": "no-such-token"}).status_code == 401
    assert client.post("/auth/refresh", json={"refresh_token": ""}).status_code == 400
    account = signup()
    db = client.application.extensions["parley_auth"].db
    with db.transaction() as session:
        for row in session.scalars(select(RefreshToken).where(RefreshToken.user_id == account.id)):
            row.expires_at = row.created_at
    assert client.post("/auth/refresh", json={"refresh_token": account.refresh_token}).status_code == 401


def test_logout_revokes_the_session(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    rotated = client.post("/auth/refresh", json={"refresh_token": account.refresh_token}).json["refresh_token"]
    assert client.post("/auth/logout", json={"refresh_token": rotated}).status_code == 204
    assert client.post("/auth/refresh", json={"refresh_token": rotated}).status_code == 401
    assert client.post("/auth/logout", json={"refresh_token": "unknown"}).status_code == 204


def test_registration_can_be_closed(make_settings: Callable[..., AuthSettings]) -> None:
    app = create_app(make_settings(registration="closed"))
    response = app.test_client().post("/auth/register", json={"email": "closed@example.com", "password": "long enough"})
    assert response.status_code == 403
    assert response.json["code"] == "registration_closed"
    app.extensions["parley_auth"].db.dispose()


def test_first_admin_is_created_once_at_start_up(make_settings: Callable[..., AuthSettings]) -> None:
    email = "Root-Admin@example.com"
    settings = make_settings(admin_email=email, admin_password="admin password 1")
    apps = [create_app(settings), create_app(settings)]
    db = apps[0].extensions["parley_auth"].db
    with db.transaction() as session:
        admins = session.scalars(select(User).where(User.email == email.lower())).all()
    assert [admin.role for admin in admins] == ["admin"]
    login = apps[1].test_client().post("/auth/token", json={"email": email, "password": "admin password 1"})
    assert login.status_code == 200 and claims_of(login.json["access_token"])["roles"] == ["admin"]
    for app in apps:
        app.extensions["parley_auth"].db.dispose()


def test_admin_lists_and_disables_users(
    client: FlaskClient, make_settings: Callable[..., AuthSettings], signup: Callable[..., Any]
) -> None:
    member = signup()
    settings = make_settings(admin_email="second-admin@example.com", admin_password="admin password 2")
    admin_app = create_app(settings)
    admin_client = admin_app.test_client()
    login = admin_client.post("/auth/token", json={"email": "second-admin@example.com", "password": "admin password 2"})
    admin_headers = auth(login.json["access_token"])

    assert client.get("/auth/users", headers=member.headers).status_code == 403
    listed = admin_client.get("/auth/users", headers=admin_headers)
    assert listed.status_code == 200 and listed.json["object"] == "list"
    assert {"id": member.id, "disabled": False}.items() <= next(
        u for u in listed.json["data"] if u["id"] == member.id
    ).items()
    assert "password_hash" not in listed.get_data(as_text=True)

    assert client.post(f"/auth/users/{member.id}/disable", headers=member.headers).status_code in (401, 403)
    assert admin_client.post(f"/auth/users/{member.id}/disable", headers=admin_headers).status_code == 204
    assert admin_client.post("/auth/users/user_nobody/disable", headers=admin_headers).status_code == 404
    # Disabled: the access token stops working here, the session is gone and the password no longer logs in.
    assert client.get("/auth/me", headers=member.headers).status_code == 401
    assert client.post("/auth/refresh", json={"refresh_token": member.refresh_token}).status_code == 401
    assert client.post("/auth/token", json={"email": member.email, "password": member.password}).status_code == 401
    admin_app.extensions["parley_auth"].db.dispose()


def test_jwks_publishes_only_public_keys(client: FlaskClient) -> None:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    keys = response.json["keys"]
    assert keys, "a signing key is ensured at start-up"
    for key in keys:
        assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and key["alg"] == "EdDSA" and key["use"] == "sig"
        assert "d" not in key


def test_start_up_leaves_exactly_one_signing_key_on_a_fresh_database(
    fresh_db_url: Callable[[str], str], make_settings: Callable[..., AuthSettings]
) -> None:
    settings = make_settings(database_url=fresh_db_url("auth_bootstrap"))
    with ThreadPoolExecutor(4) as pool:
        apps = list(pool.map(lambda _: create_app(settings), range(4)))
    with apps[0].extensions["parley_auth"].db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(SigningKey)) == 1
    for app in apps:
        app.extensions["parley_auth"].db.dispose()


def test_openapi_documents_the_routes(client: FlaskClient) -> None:
    spec = client.get("/openapi/openapi.json").json
    for path in ("/auth/register", "/auth/token", "/auth/api-keys", "/auth/internal/key-exchange", "/auth/invites"):
        assert path in spec["paths"]
    assert "patch" in spec["paths"]["/auth/users/{user_id}"]
    for schema in ("RegisterBody", "UserUpdateBody", "InviteCreatedOut"):
        assert schema in spec["components"]["schemas"]


def test_password_change_ends_sessions(client: FlaskClient, signup: Callable[..., Any]) -> None:
    account = signup()
    wrong = {"current_password": "not it", "new_password": "brand new password"}
    assert client.post("/auth/password", json=wrong, headers=account.headers).status_code == 401
    short = {"current_password": account.password, "new_password": "short"}
    assert client.post("/auth/password", json=short, headers=account.headers).status_code == 400
    change = {"current_password": account.password, "new_password": "brand new password"}
    assert client.post("/auth/password", json=change, headers=account.headers).status_code == 204
    assert client.post("/auth/refresh", json={"refresh_token": account.refresh_token}).status_code == 401
    assert client.post("/auth/token", json={"email": account.email, "password": account.password}).status_code == 401
    relogin = client.post("/auth/token", json={"email": account.email, "password": "brand new password"})
    assert relogin.status_code == 200
