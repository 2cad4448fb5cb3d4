"""Service tests (PostgreSQL): admins set roles, disable and re-enable users, and hand out invites."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update

from parley_auth import create_app
from parley_auth.models import Invite
from parley_auth.settings import AuthSettings

from .conftest import PASSWORD, Account, unique_email


def test_only_admins_may_manage_users(
    client: FlaskClient, signup: Callable[..., Account], make_admin: Callable[[], Account]
) -> None:
    member, target = signup(), signup()
    for method, path, body in (
        ("patch", f"/auth/users/{target.id}", {"disabled": True}),
        ("get", "/auth/users", None),
        ("post", "/auth/invites", {}),
        ("get", "/auth/invites", None),
    ):
        anonymous = getattr(client, method)(path, json=body)
        assert anonymous.status_code == 401, path
        forbidden = getattr(client, method)(path, json=body, headers=member.headers)
        assert forbidden.status_code == 403 and forbidden.json["code"] == "admin_required", path
    assert client.get("/auth/me", headers=target.headers).status_code == 200  # nothing happened to the target


def test_admin_sets_roles(
    client: FlaskClient, signup: Callable[..., Account], make_admin: Callable[[], Account]
) -> None:
    admin, member = make_admin(), signup()
    promoted = client.patch(f"/auth/users/{member.id}", json={"role": "admin"}, headers=admin.headers)
    assert promoted.status_code == 200
    assert promoted.json == {**promoted.json, "id": member.id, "role": "admin", "disabled": False}
    # The promoted member's next token says admin, and the admin routes let them in at once.
    assert client.get("/auth/users", headers=member.headers).status_code == 200
    refreshed = client.post("/auth/refresh", json={"refresh_token": member.refresh_token})
    assert refreshed.status_code == 200
    demoted = client.patch(f"/auth/users/{member.id}", json={"role": "member"}, headers=admin.headers)
    assert demoted.json["role"] == "member"
    assert client.get("/auth/users", headers=member.headers).status_code == 403


def test_disable_and_re_enable_without_resurrecting_sessions(
    client: FlaskClient, signup: Callable[..., Account], make_admin: Callable[[], Account]
) -> None:
    admin, member = make_admin(), signup()
    disabled = client.patch(f"/auth/users/{member.id}", json={"disabled": True}, headers=admin.headers)
    assert disabled.status_code == 200 and disabled.json["disabled"] is True
    assert client.get("/auth/me", headers=member.headers).status_code == 401
    assert client.post("/auth/token", json={"email": member.email, "password": PASSWORD}).status_code == 401
    listed = client.get("/auth/users", headers=admin.headers).json["data"]
    assert next(user for user in listed if user["id"] == member.id)["disabled"] is True

    enabled = client.patch(f"/auth/users/{member.id}", json={"disabled": False}, headers=admin.headers)
    assert enabled.status_code == 200 and enabled.json["disabled"] is False
    # The sessions revoked by the disable stay revoked; the user logs in anew.
    assert client.post("/auth/refresh", json={"refresh_token": member.refresh_token}).status_code == 401
    login = client.post("/auth/token", json={"email": member.email, "password": PASSWORD})
    assert login.status_code == 200
    assert client.post("/auth/refresh", json={"refresh_token": login.json["refresh_token"]}).status_code == 200


def test_user_updates_are_validated(
    client: FlaskClient, signup: Callable[..., Account], make_admin: Callable[[], Account]
) -> None:
    admin, member = make_admin(), signup()
    for body in ({}, {"role": "owner"}, {"disabled": "maybe"}, {"roles": ["admin"]}, [], {"role": None}):
        response = client.patch(f"/auth/users/{member.id}", json=body, headers=admin.headers)
        assert response.status_code == 400, body
        assert response.mimetype == "application/problem+json"
    assert client.patch("/auth/users/user_nobody", json={"disabled": True}, headers=admin.headers).status_code == 404
    assert client.patch("/auth/users/bad id!", json={"disabled": True}, headers=admin.headers).status_code in (400, 404)
    # No admin can lock themselves out.
    for body in ({"disabled": True}, {"role": "member"}):
        response = client.patch(f"/auth/users/{admin.id}", json=body, headers=admin.headers)
        assert response.status_code == 400, body
    assert client.patch(f"/auth/users/{admin.id}", json={"role": "admin"}, headers=admin.headers).status_code == 200
    assert client.get("/auth/users", headers=admin.headers).status_code == 200


@pytest.fixture
def invite_client(make_settings: Callable[..., AuthSettings]) -> Iterator[FlaskClient]:
    """An app whose registration is by invite only, on the shared database."""
    app = create_app(make_settings(registration="invite"))
    yield app.test_client()
    app.extensions["parley_auth"].db.dispose()


def new_invite(client: FlaskClient, admin: Account, **body: Any) -> dict[str, Any]:
    response = client.post("/auth/invites", json=body, headers=admin.headers)
    assert response.status_code == 201, response.json
    return response.json


def test_invite_only_registration(invite_client: FlaskClient, make_admin: Callable[[], Account]) -> None:
    admin = make_admin()
    email = unique_email()
    missing = invite_client.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert missing.status_code == 403 and missing.json["code"] == "invite_required"
    bogus = invite_client.post("/auth/register", json={"email": email, "password": PASSWORD, "invite_code": "inv-x"})
    assert bogus.status_code == 403 and bogus.json["code"] == "invalid_invite"

    invite = new_invite(invite_client, admin)
    assert set(invite) == {"id", "code", "created_at", "expires_at"}
    assert invite["code"].startswith("inv-") and len(invite["code"]) == len("inv-") + 43
    lifetime = datetime.fromisoformat(invite["expires_at"]) - datetime.fromisoformat(invite["created_at"])
    assert lifetime == timedelta(days=7)

    registered = invite_client.post(
        "/auth/register", json={"email": email, "password": PASSWORD, "invite_code": invite["code"]}
    )
    assert registered.status_code == 201 and registered.json["role"] == "member"
    assert invite_client.post("/auth/token", json={"email": email, "password": PASSWORD}).status_code == 200
    # Single use.
    again = invite_client.post(
        "/auth/register", json={"email": unique_email(), "password": PASSWORD, "invite_code": invite["code"]}
    )
    assert again.status_code == 403 and again.json["code"] == "invalid_invite"

    listed = invite_client.get("/auth/invites", headers=admin.headers)
    assert listed.status_code == 200 and invite["code"] not in listed.get_data(as_text=True)
    row = next(item for item in listed.json["data"] if item["id"] == invite["id"])
    assert row["used_by"] == registered.json["id"] and row["created_by"] == admin.id and row["used_at"]


def test_a_failed_registration_does_not_spend_the_invite(
    invite_client: FlaskClient, make_admin: Callable[[], Account], signup: Callable[..., Account]
) -> None:
    admin, existing = make_admin(), signup()
    code = new_invite(invite_client, admin)["code"]
    taken = invite_client.post(
        "/auth/register", json={"email": existing.email, "password": PASSWORD, "invite_code": code}
    )
    assert taken.status_code == 409
    weak = invite_client.post(
        "/auth/register", json={"email": unique_email(), "password": "short", "invite_code": code}
    )
    assert weak.status_code == 400
    fine = invite_client.post(
        "/auth/register", json={"email": unique_email(), "password": PASSWORD, "invite_code": code}
    )
    assert fine.status_code == 201


def test_expired_and_withdrawn_invites_are_refused(
    invite_client: FlaskClient, make_admin: Callable[[], Account]
) -> None:
    admin = make_admin()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    assert invite_client.post("/auth/invites", json={"expires_at": past}, headers=admin.headers).status_code == 400
    naive = "2099-01-01T00:00:00"
    assert invite_client.post("/auth/invites", json={"expires_at": naive}, headers=admin.headers).status_code == 400
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    expiring = new_invite(invite_client, admin, expires_at=soon)
    assert datetime.fromisoformat(expiring["expires_at"]) == datetime.fromisoformat(soon)
    with invite_client.application.extensions["parley_auth"].db.transaction() as session:
        session.execute(
            update(Invite)
            .where(Invite.id == expiring["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    body = {"email": unique_email(), "password": PASSWORD, "invite_code": expiring["code"]}
    assert invite_client.post("/auth/register", json=body).status_code == 403

    withdrawn = new_invite(invite_client, admin)
    assert invite_client.delete(f"/auth/invites/{withdrawn['id']}", headers=admin.headers).status_code == 204
    assert invite_client.delete(f"/auth/invites/{withdrawn['id']}", headers=admin.headers).status_code == 404
    body = {"email": unique_email(), "password": PASSWORD, "invite_code": withdrawn["code"]}
    assert invite_client.post("/auth/register", json=body).status_code == 403


def test_open_registration_ignores_invite_codes(client: FlaskClient) -> None:
    body = {"email": unique_email(), "password": PASSWORD, "invite_code": "anything"}
    assert client.post("/auth/register", json=body).status_code == 201


def test_racing_registrations_spend_an_invite_once(
    invite_client: FlaskClient, make_admin: Callable[[], Account]
) -> None:
    code = new_invite(invite_client, make_admin())["code"]
    app = invite_client.application

    def register(_: int) -> int:
        body = {"email": unique_email(), "password": PASSWORD, "invite_code": code}
        return app.test_client().post("/auth/register", json=body).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(register, range(4)))
    assert codes == [201, 403, 403, 403]
